"""Turning user inputs into backbone prompts: validation, image loading, chat template, batching.

Lives in ``modeling/`` (and so ships with every checkpoint) because ``SLQModel.encode`` needs it even when the
model is loaded with ``trust_remote_code=True`` in an interpreter that never imported slq_hf. ``slq_hf.processing``
is the public import path for these helpers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Refuse images whose header claims more pixels than this (decompression-bomb guard, ~ 16k x 16k).
MAX_IMAGE_PIXELS = 268_435_456

SLQInput = str | os.PathLike | Image.Image | dict


class SLQInputError(ValueError):
    """An input to encode/collate is malformed; the message names the input and says what to do."""


@dataclass
class SLQItem:
    """One normalised input: an RGB image, a text, or both (image first, then text, in the user turn)."""

    image: Image.Image | None = None
    text: str | None = None

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


def _where(index: int | None, path: Any = None) -> str:
    parts = []
    if index is not None:
        parts.append(f"input {index}")
    if path is not None:
        parts.append(f"file {str(path)!r}")
    return " (" + ", ".join(parts) + ")" if parts else ""


def load_image(image: Image.Image | str | os.PathLike, index: int | None = None) -> Image.Image:
    """Open/convert an image to an RGB PIL image with EXIF orientation applied.

    Raises SLQInputError naming the input for missing, unreadable, truncated or absurdly large files.
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
                with Image.open(path) as opened:
                    opened.load()
                    image = opened.copy()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        except Image.DecompressionBombError as err:
            raise SLQInputError(f"Image is too large to decode safely{_where(index, path)}: {err}. Resize it "
                                "below 268M pixels first.") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise SLQInputError(f"Cannot read image{_where(index, path)}: {err}. The file is not an image or is "
                                "truncated/corrupt; re-export it or drop it from the inputs.") from err
    elif not isinstance(image, Image.Image):
        raise SLQInputError(f"Expected a PIL image or an image path{_where(index)}, got {type(image).__name__}.")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise SLQInputError(f"Image of {image.width}x{image.height} pixels is too large{_where(index, path)}; "
                            "resize it first.")
    if image.width < 1 or image.height < 1:
        raise SLQInputError(f"Image has zero size{_where(index, path)}.")
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = _to_rgb(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels go on white (what a viewer shows); 16/32-bit greyscale is rescaled to 8 bit first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype="float64")
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else array * 0
        image = Image.fromarray(scaled.astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


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


def to_item(value: SLQInput, index: int | None = None) -> SLQItem:
    """Normalise one user input.

    Accepted: a text ``str``; a ``str``/``Path`` to an existing image file; a PIL image; a dict with ``"image"``
    and/or ``"text"``. A ``str`` is an image path only if it names an existing file with an image extension; a
    string that looks like an image path but does not exist is refused (a silent text embedding of a file name
    would be garbage).
    """
    if isinstance(value, Image.Image):
        return SLQItem(image=load_image(value, index))
    if isinstance(value, os.PathLike):
        return SLQItem(image=load_image(value, index))
    if isinstance(value, str):
        if _looks_like_image_path(value):
            if Path(value.strip()).expanduser().is_file():
                return SLQItem(image=load_image(value.strip(), index))
            raise SLQInputError(f"{value!r} looks like an image path but no such file exists{_where(index)}. Fix the "
                                "path, or pass {'text': ...} to embed it as text.")
        return SLQItem(text=_check_text(value, index))
    if isinstance(value, dict):
        unknown = set(value) - {"image", "text"}
        if unknown:
            raise SLQInputError(f"Unknown keys {sorted(unknown)}{_where(index)}; an input dict may hold 'image' and "
                                "'text'.")
        image, text = value.get("image"), value.get("text")
        if image is None and text is None:
            raise SLQInputError(f"Input dict has neither 'image' nor 'text'{_where(index)}.")
        return SLQItem(image=None if image is None else load_image(image, index),
                       text=None if text is None else _check_text(text, index))
    if value is None:
        raise SLQInputError(f"Input is None{_where(index)}; pass a text, an image, an image path or "
                            "{'image': ..., 'text': ...}.")
    raise SLQInputError(f"Unsupported input type {type(value).__name__}{_where(index)}; pass a text, a PIL image, "
                        "an image path or {'image': ..., 'text': ...}.")


def to_items(inputs: SLQInput | list[SLQInput]) -> list[SLQItem]:
    """Normalise a single input or a list of inputs; errors name the offending index."""
    if isinstance(inputs, (str, os.PathLike, Image.Image, dict)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise SLQInputError(f"Expected a list of inputs, got {type(inputs).__name__}.")
    return [to_item(value, index) for index, value in enumerate(inputs)]


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


def _warn_truncation(processor, batch, max_length: int | None) -> None:
    if max_length is not None and batch["input_ids"].shape[1] > max_length:
        warnings.warn(f"A prompt has {batch['input_ids'].shape[1]} tokens, more than max_length={max_length}.",
                      stacklevel=3)


def collate(processor, items: list[SLQItem], instruction: str | None = None):
    """Apply the backbone's chat template (generation prompt added) and its processor to a batch of items.

    Returns the processor's ``BatchFeature``: input_ids/attention_mask (B, L) plus image tensors; padding side is
    whatever the processor uses (SLQModel re-lays rows to left padding itself).
    """
    if not items:
        raise SLQInputError("Cannot collate an empty batch.")
    conversations = [build_messages(item, instruction) for item in items]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
