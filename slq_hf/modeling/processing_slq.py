"""Turning user inputs into backbone prompts: validation, image loading, chat template, batching.

Lives in ``modeling/`` (and so ships with every checkpoint) because ``SLQModel.encode`` needs it even when the
model is loaded with ``trust_remote_code=True`` in an interpreter that never imported slq_hf. ``slq_hf.processing``
is the public import path for these helpers.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Refuse images whose header claims more pixels than this (decompression-bomb guard, ~ 16k x 16k).
MAX_IMAGE_PIXELS = 268_435_456

SLQInput = str | os.PathLike | Image.Image | dict
# Tokenizers without a real limit report transformers' VERY_LARGE_INTEGER (1e30) as model_max_length.
_NO_LIMIT = 10**12
# Errors a processor raises for an input it cannot handle (e.g. Qwen-VL: aspect ratio >= 200); they are re-raised
# as SLQInputError naming the input.
_PROCESSOR_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, OSError)


class SLQInputError(ValueError):
    """An input to encode/collate is malformed; the message names the input and says what to do."""


@dataclass
class SLQItem:
    """One normalised input: an RGB image, a text, or both (image first, then text, in the user turn)."""

    image: Image.Image | None = None
    text: str | None = None
    # Where the item came from ("input 3, file 'cat.jpg'"), so errors raised later (collate) can name it.
    source: str | None = None

    @property
    def kind(self) -> str:
        if self.image is not None:
            return "image+text" if self.text is not None else "image"
        return "text"

    def length_key(self) -> tuple[int, int]:
        """Sort key that groups similar prompt lengths: modality first, then pixels, then characters."""
        order = {"text": 0, "image": 1, "image+text": 2}[self.kind]
        pixels = self.image.width * self.image.height if self.image is not None else 0
        return order, pixels + len(self.text or "")


def _label(index: int | None, path: Any = None) -> str | None:
    parts = []
    if index is not None:
        parts.append(f"input {index}")
    if path is not None:
        parts.append(f"file {str(path)!r}")
    return ", ".join(parts) if parts else None


def _where(index: int | None, path: Any = None) -> str:
    label = _label(index, path)
    return f" ({label})" if label else ""


# ------------------------------------------------------------------------------------------------ image budget
@dataclass(frozen=True)
class ImageBudget:
    """How far an image may be shrunk before the processor sees it without changing what the processor produces.

    Every processor resizes images to its own resolution anyway; shrinking a huge image with PIL first (and decoding
    JPEGs at reduced scale) makes a 50-megapixel photo cost about as much as a 1-megapixel one.

    Attributes:
        max_pixels: pixel-count budget (Qwen-VL style processors resize to at most this many pixels).
        unit: with ``max_pixels``: the processor makes both sides multiples of this (Qwen-VL: patch x merge size).
            The image is then shrunk to exactly the size the processor's own rule would pick, so the processor does
            no second resize and the token grid is the one the full-size image would get.
        max_long_side: the longer side may be shrunk to this (processors that resize the longest edge).
        max_short_side: the shorter side may be shrunk to this (shortest-edge, fixed-size and tiling processors).
    """

    max_pixels: int | None = None
    unit: int | None = None
    max_long_side: int | None = None
    max_short_side: int | None = None

    def target_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) to shrink a ``width`` x ``height`` image to, or None when it already fits."""
        if self.max_pixels and self.unit and max(width, height) / min(width, height) <= 200:
            # Qwen2-VL's smart_resize: sides rounded to the unit; when that exceeds the budget, scale by beta and
            # floor to the unit. Only the second branch shrinks, so only then do we act (extreme aspect ratios
            # are left to the processor, which refuses them with its own message).
            unit = self.unit
            if round(height / unit) * unit * round(width / unit) * unit <= self.max_pixels:
                return None
            beta = math.sqrt(height * width / self.max_pixels)
            return (max(unit, math.floor(width / beta / unit) * unit),
                    max(unit, math.floor(height / beta / unit) * unit))
        factors = [1.0]
        if self.max_pixels:
            factors.append(math.sqrt(self.max_pixels / (width * height)))
        if self.max_long_side:
            factors.append(self.max_long_side / max(width, height))
        if self.max_short_side:
            factors.append(self.max_short_side / min(width, height))
        factor = min(factors)
        if factor >= 1.0:
            return None
        # Short side rounded up, long side down: the aspect ratio never grows (Qwen-VL refuses ratios > 200).
        new_width, new_height = width * factor, height * factor
        if new_width <= new_height:
            return math.ceil(new_width), max(1, math.floor(new_height))
        return max(1, math.floor(new_width)), math.ceil(new_height)


def _size_values(size: Any) -> dict[str, int]:
    # Image processors keep sizes as dicts or SizeDict objects; read both the same way.
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_pixels", "max_height", "max_width")
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    return {k: int(v) for k in keys if isinstance(v := get(k), (int, float)) and not isinstance(v, bool) and v > 0}


def image_budget(processor: Any) -> ImageBudget | None:
    """The :class:`ImageBudget` of a backbone processor, read from its image processor's settings.

    One row per way processors resize (not per model family), so new processors of a known kind just work:

    - pixel budget (Qwen2-VL/2.5-VL/3-VL: ``size.longest_edge`` counts pixels): shrink to exactly that many pixels;
      the processor would resize to at most that many anyway.
    - longest-edge resize (Idefics3, SmolVLM): shrink the longer side to 2x ``size.longest_edge``.
    - everything else (CLIP/LLaVA shortest edge + crop, fixed height/width, tiles of InternVL/LLaVA-NeXT/
      OneVision/Gemma 3 pan-and-scan): shrink the SHORTER side to 2x the largest side the processor can output,
      counting tiles. Bounding the shorter side never removes detail the processor would keep.

    The 2x margin leaves the final (antialiased) resize to the processor. Returns None when the processor has no
    image processor or does not resize.
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "do_resize", True) is False:
        return None
    size = _size_values(getattr(image_processor, "size", None))
    explicit = getattr(image_processor, "max_pixels", None)
    if isinstance(explicit, int) and explicit > 0:
        return ImageBudget(max_pixels=explicit)
    if "max_pixels" in size:
        return ImageBudget(max_pixels=size["max_pixels"])
    if getattr(image_processor, "temporal_patch_size", None) and "longest_edge" in size:
        # Qwen-VL: size counts pixels, not a side length; sides are multiples of patch x merge size.
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        unit = patch * merge if isinstance(patch, int) and isinstance(merge, int) else None
        return ImageBudget(max_pixels=size["longest_edge"], unit=unit)
    if "longest_edge" in size and not getattr(image_processor, "image_grid_pinpoints", None):
        return ImageBudget(max_long_side=2 * size["longest_edge"])
    sides = [v for k, v in size.items() if k != "max_pixels"]
    for attribute in ("crop_size", "max_image_size"):
        sides += _size_values(getattr(image_processor, attribute, None)).values()
    for pinpoint in getattr(image_processor, "image_grid_pinpoints", None) or []:
        sides += [int(v) for v in pinpoint]
    if not sides:
        return None
    tiles = 1
    if getattr(image_processor, "crop_to_patches", False):
        tiles = int(getattr(image_processor, "max_patches", 1) or 1)
    if getattr(image_processor, "do_pan_and_scan", False):
        tiles = int(getattr(image_processor, "pan_and_scan_max_num_crops", 1) or 1)
    return ImageBudget(max_short_side=2 * max(sides) * tiles)


def fit_image(image: Image.Image, budget: ImageBudget | None) -> Image.Image:
    """Shrink ``image`` (aspect ratio kept, bicubic) to ``budget``; returned unchanged when it already fits."""
    size = budget.target_size(image.width, image.height) if budget is not None else None
    if size is None or (size[0] >= image.width and size[1] >= image.height):
        return image
    # reducing_gap: box-reduce by an integer factor first, then bicubic; as good as plain bicubic and much faster.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _too_large(width: int, height: int, index: int | None, path: Any) -> SLQInputError:
    return SLQInputError(f"Image of {width}x{height} pixels is too large to decode safely{_where(index, path)} (limit "
                         f"{MAX_IMAGE_PIXELS:,} pixels, a guard against decompression bombs). Downscale it first, or "
                         "raise slq_hf.modeling.processing_slq.MAX_IMAGE_PIXELS if you trust the file.")


def load_image(image: Image.Image | str | os.PathLike, index: int | None = None,
               budget: ImageBudget | None = None) -> Image.Image:
    """Open/convert an image to an RGB PIL image with EXIF orientation applied.

    Args:
        image: a PIL image or the path of an image file.
        index: position of the input, named in errors.
        budget: shrink the image to this budget (:func:`image_budget`); JPEG files are then decoded at reduced
            scale, which is what makes huge photos cheap.

    Raises SLQInputError naming the input for missing, unreadable, truncated, empty or absurdly large images.
    """
    path = None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise SLQInputError(f"Image file not found{_where(index, path)}. Check the path (relative paths are "
                                f"resolved from {os.getcwd()!r}).")
        try:
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
            try:
                with warnings.catch_warnings():
                    # PIL only warns between 1x and 2x its limit; the header check below refuses those images.
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    opened = Image.open(path)
                with opened:
                    # The header gives the size: refuse before decoding anything.
                    if opened.width * opened.height > MAX_IMAGE_PIXELS:
                        raise _too_large(opened.width, opened.height, index, path)
                    target = budget.target_size(opened.width, opened.height) if budget is not None else None
                    if target is not None:
                        # JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the requested size.
                        opened.draft(None, target)
                    opened.load()
                    image = opened.copy()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        except Image.DecompressionBombError as err:
            raise SLQInputError(f"Image is too large to decode safely{_where(index, path)}: {err}. Downscale it "
                                f"below {MAX_IMAGE_PIXELS:,} pixels first.") from err
        except SLQInputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise SLQInputError(f"Cannot read image{_where(index, path)}: {err}. The file is not an image or is "
                                "truncated/corrupt; re-export it or drop it from the inputs.") from err
    elif not isinstance(image, Image.Image):
        raise SLQInputError(f"Expected a PIL image or an image path{_where(index)}, got {type(image).__name__}.")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise _too_large(image.width, image.height, index, path)
    if image.width < 1 or image.height < 1:
        raise SLQInputError(f"Image has zero size ({image.width}x{image.height}){_where(index, path)}; drop it.")
    try:
        image = ImageOps.exif_transpose(image)
        # Shrink before the mode conversion: converting a huge image is the other expensive step.
        image = fit_image(image, budget)
        if image.mode != "RGB":
            image = _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:
        # A PIL image given directly may be lazily loaded: truncation shows only now.
        raise SLQInputError(f"Cannot decode image{_where(index, path)}: {err}. The image data is truncated or "
                            "corrupt; re-export it or drop it from the inputs.") from err
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels go on white (what a viewer shows); 16/32-bit greyscale is rescaled to 8 bit first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.nan_to_num(np.asarray(image, dtype="float64"), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else array * 0
        image = Image.fromarray(scaled.astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight-alpha twin
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _is_file(text: str) -> bool:
    # Texts are probed as paths: a 5000-character caption or one with a NUL byte must not raise here.
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _looks_like_image_path(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and not any(c.isspace() for c in stripped) and stripped.lower().endswith(IMAGE_EXTENSIONS)


def _check_text(text: Any, index: int | None) -> str:
    if not isinstance(text, str):
        raise SLQInputError(f"Expected text as str{_where(index)}, got {type(text).__name__}.")
    if not text.strip():
        raise SLQInputError(f"Text is empty or whitespace only{_where(index)}; an empty prompt has nothing to embed. "
                            "Remove the input or give it content.")
    return text


def to_item(value: SLQInput, index: int | None = None, budget: ImageBudget | None = None) -> SLQItem:
    """Normalise one user input.

    Accepted: a text ``str``; a ``str``/``Path`` to an existing image file; a PIL image; a dict with ``"image"``
    and/or ``"text"``. A ``str`` is an image path only if it names an existing file with an image extension; a
    string that looks like an image path but does not exist is refused (a silent text embedding of a file name
    would be garbage). ``budget`` (:func:`image_budget`) shrinks huge images while loading them.
    """
    if isinstance(value, (Image.Image, os.PathLike)):
        path = value if isinstance(value, os.PathLike) else None
        return SLQItem(image=load_image(value, index, budget), source=_label(index, path))
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lower().endswith(IMAGE_EXTENSIONS) and _is_file(stripped):
            # An existing image file is the image, even with spaces in its name ("my cat.jpg").
            return SLQItem(image=load_image(stripped, index, budget), source=_label(index, stripped))
        if _looks_like_image_path(value):
            raise SLQInputError(f"{value!r} looks like an image path but no such file exists{_where(index)}. Fix the "
                                "path, or pass {'text': ...} to embed it as text.")
        return SLQItem(text=_check_text(value, index), source=_label(index))
    if isinstance(value, dict):
        unknown = set(value) - {"image", "text"}
        if unknown:
            raise SLQInputError(f"Unknown keys {sorted(unknown)}{_where(index)}; an input dict may hold 'image' and "
                                "'text'.")
        image, text = value.get("image"), value.get("text")
        if image is None and text is None:
            raise SLQInputError(f"Input dict has neither 'image' nor 'text'{_where(index)}.")
        path = image if isinstance(image, (str, os.PathLike)) else None
        return SLQItem(image=None if image is None else load_image(image, index, budget),
                       text=None if text is None else _check_text(text, index), source=_label(index, path))
    if value is None:
        raise SLQInputError(f"Input is None{_where(index)}; pass a text, an image, an image path or "
                            "{'image': ..., 'text': ...}, or drop it.")
    if isinstance(value, (list, tuple)):
        raise SLQInputError(f"Nested {type(value).__name__}{_where(index)}: inputs must be a flat list. Flatten it, "
                            "or pass {'image': ..., 'text': ...} to embed an image and a text together.")
    hint = " Convert arrays/tensors with PIL.Image.fromarray first." if hasattr(value, "shape") else ""
    raise SLQInputError(f"Unsupported input type {type(value).__name__}{_where(index)}; pass a text, a PIL image, "
                        "an image path or {'image': ..., 'text': ...}." + hint)


def to_items(inputs: SLQInput | list[SLQInput], budget: ImageBudget | None = None) -> list[SLQItem]:
    """Normalise a single input or a list of inputs; errors name the offending index."""
    if isinstance(inputs, (str, os.PathLike, Image.Image, dict)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise SLQInputError(f"Expected a list of inputs, got {type(inputs).__name__}.")
    return [to_item(value, index, budget) for index, value in enumerate(inputs)]


def prepare_inputs(inputs: SLQInput | list[SLQInput], processor: Any = None) -> list[str | Image.Image | dict]:
    """Validate and convert inputs exactly as ``SLQModel.encode`` does, for APIs that run the processor themselves
    (sentence-transformers: ``st.encode(prepare_inputs(inputs, st[0].processor))``).

    Texts stay ``str``; images (PIL or path) become RGB PIL images: EXIF-transposed, mode-converted, checked against
    the decompression-bomb limit and, with ``processor``, shrunk to its :func:`image_budget`; image+text inputs
    become ``{"image": PIL, "text": str}``. Raises SLQInputError naming the index, like ``encode``.
    """
    budget = image_budget(processor) if processor is not None else None
    prepared: list[str | Image.Image | dict] = []
    for item in to_items(inputs, budget):
        if item.image is not None and item.text is not None:
            prepared.append({"image": item.image, "text": item.text})
        else:
            prepared.append(item.image if item.image is not None else item.text)
    return prepared


def build_messages(item: SLQItem, instruction: str | None = None) -> list[dict]:
    """The paper's prompt: one user turn holding the (optional) instruction, the image and the text."""
    content: list[dict] = []
    if instruction:
        content.append({"type": "text", "text": instruction})
    if item.image is not None:
        content.append({"type": "image", "image": item.image})
    if item.text is not None:
        content.append({"type": "text", "text": item.text})
    return [{"role": "user", "content": content}]


def prompt_length_limit(backbone_config: Any, tokenizer: Any = None, reserved: int = 0) -> int | None:
    """Longest prompt, in tokens, the backbone accepts when ``reserved`` more positions (the queries) follow it.

    The limit is the text model's ``max_position_embeddings`` and the tokenizer's ``model_max_length`` (ignored when
    it is transformers' "no limit" sentinel), whichever is smaller; None when neither is known.
    """
    limits = []
    text_config = backbone_config.get_text_config() if hasattr(backbone_config, "get_text_config") else backbone_config
    for config in (text_config, backbone_config):
        value = getattr(config, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _NO_LIMIT:
        limits.append(value)
    if not limits:
        return None
    limit = min(limits) - reserved
    if limit < 1:
        raise ValueError(f"The backbone accepts {min(limits)} positions, which leaves no room for a prompt before "
                         f"{reserved} queries; use fewer queries.")
    return limit


def _template(processor, items: list[SLQItem], instruction: str | None):
    conversations = [build_messages(item, instruction) for item in items]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def _template_checked(processor, items: list[SLQItem], instruction: str | None):
    """``_template`` that turns a processor failure into an SLQInputError naming the item that caused it."""
    try:
        return _template(processor, items, instruction)
    except _PROCESSOR_ERRORS as err:
        culprit, cause = None, err
        if len(items) == 1:
            culprit = items[0]
        else:  # find the item the processor refuses on its own (rare path: only after a failure)
            for item in items:
                try:
                    _template(processor, [item], instruction)
                except _PROCESSOR_ERRORS as item_err:
                    culprit, cause = item, item_err
                    break
        if culprit is None:
            raise
        where = f" ({culprit.source})" if culprit.source else ""
        size = f" (image {culprit.image.width}x{culprit.image.height})" if culprit.image is not None else ""
        raise SLQInputError(f"The backbone's processor cannot handle this {culprit.kind} input{where}{size}: "
                            f"{type(cause).__name__}: {cause}. Fix the input (e.g. crop or pad an image with an "
                            "extreme aspect ratio) or drop it.") from cause


def _row_lengths(batch) -> list[int]:
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    return [int(n) for n in mask.sum(dim=1)]


def _truncate_text(processor, item: SLQItem, instruction: str | None, max_length: int, length: int) -> SLQItem:
    """Shorten the user text of ``item`` until its whole templated prompt fits ``max_length`` tokens.

    Truncating the text, not the token sequence, keeps the chat template's suffix (end of turn + generation prompt),
    so the queries still follow the generation prompt as in training.
    """
    where = f" ({item.source})" if item.source else ""
    if item.text is None:
        raise SLQInputError(f"The prompt of this image input{where} has {length} tokens, more than the {max_length} "
                            "the model accepts before its queries; use a smaller image or lower the processor's "
                            "max_pixels.")
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
    keep, current = len(ids), length
    # Tokens at the cut may merge differently once re-tokenised in context, so re-measure and repeat if needed.
    for _ in range(8):
        keep -= max(1, current - max_length)
        if keep < 1:
            raise SLQInputError(f"The prompt{where} exceeds the model's limit of {max_length} tokens even without its "
                                "text (instruction, image and chat template alone are too long); shorten the "
                                "instruction or use a smaller image.")
        candidate = replace(item, text=tokenizer.decode(ids[:keep], skip_special_tokens=False))
        current = _row_lengths(_template(processor, [candidate], instruction))[0]
        if current <= max_length:
            warnings.warn(f"Text{where} is too long: its prompt has {length} tokens, more than the model's limit of "
                          f"{max_length} (positions left for the prompt before the queries). Kept the first {keep} of "
                          f"{len(ids)} text tokens and the whole chat template; shorten the text to avoid this.",
                          UserWarning, stacklevel=3)
            return candidate
    raise SLQInputError(f"Could not truncate the text{where} to fit {max_length} tokens; shorten it.")


def collate(processor, items: list[SLQItem], instruction: str | None = None, max_length: int | None = None):
    """Apply the backbone's chat template (generation prompt added) and its processor to a batch of items.

    Images larger than the processor's budget (:func:`image_budget`) are shrunk with PIL first. With
    ``max_length`` (see :func:`prompt_length_limit`), a prompt longer than that has its user text truncated, with a
    warning, so that the full templated prompt fits. A processor failure is raised as SLQInputError naming the item.

    Returns the processor's ``BatchFeature``: input_ids/attention_mask (B, L) plus image tensors; padding side is
    whatever the processor uses (SLQModel re-lays rows to left padding itself).
    """
    if not items:
        raise SLQInputError("Cannot collate an empty batch.")
    budget = image_budget(processor)
    items = [item if item.image is None else replace(item, image=fit_image(item.image, budget)) for item in items]
    batch = _template_checked(processor, items, instruction)
    if max_length is not None:
        lengths = _row_lengths(batch)
        if max(lengths) > max_length:
            for position, length in enumerate(lengths):  # a loop, not a comprehension: keeps warning stacklevels
                if length > max_length:
                    items[position] = _truncate_text(processor, items[position], instruction, max_length, length)
            batch = _template_checked(processor, items, instruction)
    return batch
