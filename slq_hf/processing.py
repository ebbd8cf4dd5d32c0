"""Public home of SLQ's input handling (validation, image loading, chat-template prompts, batching).

The implementation lives in ``slq_hf/modeling/processing_slq.py`` because ``SLQModel.encode`` needs it inside
remote-code checkpoints too.
"""

from .modeling.processing_slq import (
    IMAGE_EXTENSIONS,
    ImageBudget,
    SLQInput,
    SLQInputError,
    SLQItem,
    build_messages,
    collate,
    fit_image,
    image_budget,
    load_image,
    prepare_inputs,
    prompt_length_limit,
    to_item,
    to_items,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBudget",
    "SLQInput",
    "SLQInputError",
    "SLQItem",
    "build_messages",
    "collate",
    "fit_image",
    "image_budget",
    "load_image",
    "prepare_inputs",
    "prompt_length_limit",
    "to_item",
    "to_items",
]
