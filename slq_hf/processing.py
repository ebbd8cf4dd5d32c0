"""Public home of SLQ's input handling (validation, image loading, chat-template prompts, batching).

The implementation lives in ``slq_hf/modeling/`` (``processing_slq.py``, ``image_files.py``, ``control_tokens.py``)
because ``SLQModel.encode`` needs it inside remote-code checkpoints too.
"""

from .modeling.control_tokens import control_strings, split_text_ids
from .modeling.image_files import MAX_DECODED_BYTES, decode_image, pending_image
from .modeling.processing_slq import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    ImageBudget,
    PendingImage,
    SLQInput,
    SLQInputError,
    SLQItem,
    build_messages,
    collate,
    encode_batches,
    estimate_tokens,
    fit_image,
    image_budget,
    limit_text,
    load_image,
    looks_like_path,
    open_image,
    plan_batches,
    prepare_inputs,
    prompt_length_limit,
    to_item,
    to_items,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_DECODED_BYTES",
    "ImageBudget",
    "PendingImage",
    "SLQInput",
    "SLQInputError",
    "SLQItem",
    "build_messages",
    "collate",
    "control_strings",
    "decode_image",
    "encode_batches",
    "estimate_tokens",
    "fit_image",
    "image_budget",
    "limit_text",
    "load_image",
    "looks_like_path",
    "open_image",
    "pending_image",
    "plan_batches",
    "prepare_inputs",
    "prompt_length_limit",
    "split_text_ids",
    "to_item",
    "to_items",
]
