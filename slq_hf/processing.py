"""Public home of SLQ's input handling (validation, image loading, chat-template prompts, batching).

The implementation lives in ``slq_hf/modeling/`` (``processing_slq.py``, ``image_files.py``, ``control_tokens.py``)
because ``SLQModel.encode`` needs it inside remote-code checkpoints too. :func:`prepare_inputs`, which only callers
of the installed library use, lives here.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from .modeling.budgets import image_rule, text_budget
from .modeling.control_tokens import control_strings, split_text_ids
from .modeling.image_files import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_DECODED_BYTES,
    ImageBudget,
    PendingImage,
    SLQInputError,
    decode_image,
    fit_image,
    image_budget,
    load_image,
    open_image,
    pending_image,
)
from .modeling.processing_slq import (
    SLQInput,
    SLQItem,
    build_messages,
    collate,
    encode_batches,
    estimate_tokens,
    limit_text,
    looks_like_path,
    plan_batches,
    prompt_length_limit,
    template_overhead,
    to_item,
    to_items,
)


def prepare_inputs(inputs: SLQInput | list[SLQInput], processor: Any = None) -> list[Image.Image | dict]:
    """Validate and convert inputs exactly as ``SLQModel.encode`` does, for APIs that run the processor themselves
    (sentence-transformers: ``st.encode(prepare_inputs(inputs, st[0].processor))``).

    Texts become ``{"text": str}`` (a text, even one naming a file); images (PIL or path) become RGB PIL images:
    EXIF-transposed, mode-converted, first frame only, checked against the decoded-size limit and, with
    ``processor``, shrunk to its :func:`image_budget`; image+text inputs become ``{"image": PIL, "text": str}``.
    Raises SLQInputError naming the index, like ``encode``. All images are decoded at once: pass a batch at a time
    for large inputs.
    """
    budget = image_budget(processor) if processor is not None else None
    items = to_items(inputs, budget, lazy=False)
    if processor is not None:
        items = [limit_text(processor, item, text_budget(processor)) for item in items]
        rule = image_rule(processor)
        for item in [i for i in items if i.image is not None and rule is not None]:
            try:  # what encode's processor would refuse (Qwen-VL: aspect ratio > 200)
                rule.tokens(processor.image_processor, *item.image.size)
            except ValueError as err:
                raise SLQInputError(f"The backbone's processor cannot handle this image input ({item.source}) (image "
                                    f"{item.image.width}x{item.image.height}): {err}. Fix the input (e.g. crop or "
                                    "pad an image with an extreme aspect ratio) or drop it.") from err
    return [sentence_transformers_input(item) for item in items]


def sentence_transformers_input(item: SLQItem) -> Image.Image | dict:
    """A decoded item as sentence-transformers takes it: the PIL image, ``{"image", "text"}``, or ``{"text": str}``
    (a bare str naming an existing file would be opened as an image by sentence-transformers)."""
    if item.image is not None:
        return item.image if item.text is None else {"image": item.image, "text": item.text}
    return {"text": item.text}


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
    "sentence_transformers_input",
    "split_text_ids",
    "template_overhead",
    "to_item",
    "to_items",
]
