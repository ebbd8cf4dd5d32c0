"""Opening and decoding images with bounded cost: a format allowlist, a decoded-size limit read from the header, and
lazy images that are validated up front but decoded only when their batch is built.

Part of ``modeling/`` (it ships with every checkpoint); ``slq_hf.processing`` re-exports the public names.

Rules, in the order they are applied:

1. Only the raster formats of :data:`IMAGE_FORMATS` are opened (``Image.open(..., formats=...)``), so PIL never runs
   Ghostscript for a PostScript file named ``photo.png``. A PIL image the caller opened lazily is refused before
   decoding when its format is not in the list.
2. The decoded size (first frame, bytes as PIL stores the mode, after a JPEG's reduced-scale decode) and the RGB
   result are checked against :data:`MAX_DECODED_BYTES` from the header, before any pixel is decoded. PIL's
   process-global ``Image.MAX_IMAGE_PIXELS`` is never modified.
3. Only the first frame of an animation or multi-page file is decoded, so frames do not multiply the cost.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageFile

from .budgets import PixelRule, resize_function

# The raster formats slq_hf decodes: PIL format name -> file extensions. Anything else (PostScript/EPS, which PIL
# renders by running Ghostscript; PDF; SVG; ...) is refused before any decoder runs. MPO is PIL's name for the
# multi-picture JPEGs of phones and cameras; it opens through the JPEG plugin.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "MPO": (),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
IMAGE_EXTENSIONS = tuple(ext for extensions in IMAGE_FORMATS.values() for ext in extensions)
# What Image.open tries: MPO has no opener of its own (the JPEG one returns MPO images).
_ALLOWED = tuple(f for f in IMAGE_FORMATS if f != "MPO")
# Refuse an image whose decoded pixels or whose RGB result would take more than this many bytes. Checked on the
# header, before decoding; the peak memory of one image is a small multiple of it. Module-level so that callers can
# raise it for trusted files (slq_hf.modeling.image_files.MAX_DECODED_BYTES = ...).
MAX_DECODED_BYTES = 256 * 2**20
# Bytes per pixel of PIL's in-memory layout: 8-bit single-band modes one byte, 16-bit grey two, every other mode
# (RGB, RGBA, CMYK, LA, ... and 32-bit I/F) four. RGB, the mode every image ends in, takes four too.
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_BYTES_PER_PIXEL = 4
# Rows per chunk when 16/32-bit images are rescaled to 8 bit, so the float copy never spans the whole image.
_RESCALE_ROWS = 256
# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table). Applied here
# because exif_transpose also writes the EXIF back, which raises struct.error on a tag of an unexpected type.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class SLQInputError(ValueError):
    """An input to encode/collate is malformed; the message names the input and says what to do."""


def _where(label: str | None) -> str:
    return f" ({label})" if label else ""


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Bytes PIL needs to hold a decoded ``width`` x ``height`` image of ``mode`` (one frame)."""
    return width * height * _BYTES_PER_PIXEL.get(mode, 4)


def _names() -> str:
    return ", ".join(_ALLOWED)


def _too_large(width: int, height: int, mode: str, needed: int, label: str | None) -> SLQInputError:
    return SLQInputError(
        f"Image of {width}x{height} pixels (mode {mode}) is too large to decode safely{_where(label)}: it needs "
        f"{needed / 2**20:,.0f} MiB, more than the limit of {MAX_DECODED_BYTES / 2**20:,.0f} MiB (a guard against "
        "decompression bombs). Downscale it first, or raise slq_hf.modeling.image_files.MAX_DECODED_BYTES if you "
        "trust the file.")


def check_cost(image: Image.Image, target: tuple[int, int] | None, label: str | None,
               decoded: bool = False) -> None:
    """Refuse ``image`` (an opened header or a decoded image) when decoding it or its RGB result is too large.

    ``target``: the size it will be shrunk to before the RGB conversion (None: kept at full size). ``decoded``: the
    pixels are already in memory (a caller's PIL image), so only the RGB result counts.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise SLQInputError(f"Image has zero size ({width}x{height}){_where(label)}; drop it.")
    out_width, out_height = target or (width, height)
    decoding = 0 if decoded else decoded_bytes(image.mode, width, height)
    needed = max(decoding, out_width * out_height * _RGB_BYTES_PER_PIXEL)
    if needed > MAX_DECODED_BYTES:
        raise _too_large(width, height, image.mode, needed, label)


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
    # With ``unit``: the processor's own smart_resize(height, width, factor, min_pixels, max_pixels) and its minimum.
    resize: Any = None
    min_pixels: int | None = None

    def target_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) to shrink a ``width`` x ``height`` image to, or None when it already fits.

        Always computed from the image's full stored size (not a JPEG's reduced-scale draft), so every path that
        starts from the same file or PIL image gets the same size, and that size is the processor's own grid.
        """
        if self.max_pixels and self.unit and max(width, height) / min(width, height) <= 200:
            # Qwen2-VL's smart_resize: sides rounded to the unit; when that exceeds the budget, scale down and floor
            # to the unit. Only then is there anything to shrink (smaller images are left to the processor, which
            # also refuses extreme aspect ratios with its own message).
            unit = self.unit
            if round(height / unit) * unit * round(width / unit) * unit <= self.max_pixels:
                return None
            if self.resize is not None:
                new_height, new_width = self.resize(height, width, factor=unit, min_pixels=self.min_pixels or 1,
                                                    max_pixels=self.max_pixels)
                return new_width, new_height
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
    if getattr(image_processor, "temporal_patch_size", None) and "longest_edge" in size:
        # Qwen-VL: size counts pixels, not a side length; sides are multiples of patch x merge size. The pixel
        # range its resize really uses (size, or min/max_pixels attributes set over it) and its own smart_resize
        # decide, so the pre-shrink lands on the processor's grid.
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        unit = patch * merge if isinstance(patch, int) and isinstance(merge, int) else None
        low, high = PixelRule.pixels(image_processor)
        return ImageBudget(max_pixels=high, unit=unit, resize=resize_function(image_processor), min_pixels=low)
    explicit = getattr(image_processor, "max_pixels", None)
    if isinstance(explicit, int) and explicit > 0:
        return ImageBudget(max_pixels=explicit)
    if "max_pixels" in size:
        return ImageBudget(max_pixels=size["max_pixels"])
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


def fit_image(image: Image.Image, budget: ImageBudget | None, target: tuple[int, int] | None = None
              ) -> Image.Image:
    """Shrink ``image`` (aspect ratio kept, bicubic) to ``budget`` (or to ``target``, a size computed from the
    image's full size before a reduced-scale decode); returned unchanged when it already fits."""
    size = target or (budget.target_size(image.width, image.height) if budget is not None else None)
    if size is None or (size[0] >= image.width and size[1] >= image.height):
        return image
    # reducing_gap: box-reduce by an integer factor first, then bicubic; as good as plain bicubic and much faster.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)




# -------------------------------------------------------------------------------------------- opening, decoding
def _unreadable(err: BaseException, label: str | None) -> SLQInputError:
    return SLQInputError(f"Cannot read image{_where(label)}: {err}. The file is not an image or is truncated/corrupt; "
                         "re-export it or drop it from the inputs.")


def open_image(source: str | os.PathLike | io.BytesIO | bytes, label: str | None = None) -> ImageFile.ImageFile:
    """Open an image file (path, bytes or binary file object) lazily: only its header is read.

    Raises SLQInputError naming ``label`` when the file is missing, a folder, not one of :data:`IMAGE_FORMATS`,
    unreadable or of zero size. The decoded-size limit is checked by the decoding functions, which know the budget
    the image will be shrunk to. The caller closes the result.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).expanduser()
        if not source.is_file():
            problem = ("is a folder, not an image file" if source.is_dir() else
                       "is not a regular file (a pipe, device or socket)" if source.exists() else "not found")
            raise SLQInputError(f"Image file {problem}{_where(label)}. Check the path (relative paths are resolved "
                                f"from {os.getcwd()!r}).")
    try:
        opened = Image.open(source, formats=_ALLOWED)
    except Image.UnidentifiedImageError as err:
        raise SLQInputError(f"Cannot read image{_where(label)}: the file is not an image slq_hf decodes ({_names()}; "
                            "PostScript/EPS, PDF, SVG and other formats are refused without running anything), or it "
                            "is corrupt. Convert it to PNG or JPEG, or drop it from the inputs.") from err
    except Image.DecompressionBombError as err:  # PIL's own process-wide limit, as the caller has set it
        raise SLQInputError(f"Image is too large to decode safely{_where(label)}: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _unreadable(err, label) from err
    if opened.width < 1 or opened.height < 1:
        opened.close()
        raise SLQInputError(f"Image has zero size ({opened.width}x{opened.height}){_where(label)}; drop it.")
    return opened


def _plan(opened: ImageFile.ImageFile, budget: ImageBudget | None, label: str | None) -> tuple[int, int] | None:
    """Ask a JPEG for a reduced-scale decode when the budget allows, then refuse what is still too large.

    Returns the target size, computed from the FULL stored size: the draft rounds sides, and a size computed from
    it could land on another grid than the processor picks for the full image."""
    target = budget.target_size(opened.width, opened.height) if budget is not None else None
    if target is not None and opened.format in ("JPEG", "MPO"):
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the requested size; opened.size becomes that size.
        opened.draft(None, target)
    check_cost(opened, target, label)
    return target


def is_undecoded(image: Image.Image) -> bool:
    """True for a PIL image opened from a file whose pixels are not decoded yet (``Image.open`` without ``load``)."""
    return isinstance(image, ImageFile.ImageFile) and bool(getattr(image, "tile", None))


def check_pil_image(image: Image.Image, budget: ImageBudget | None, label: str | None) -> None:
    """Refuse a caller's PIL image that would be unsafe to decode or convert: one opened from a file of a format
    outside :data:`IMAGE_FORMATS` (decoding an EPS runs Ghostscript), zero size, or too large (:func:`check_cost`)."""
    # Some plugins (ICO, EPS) decode in their own load(), so "not decoded yet" cannot be told for every format:
    # any image a file decoder produced counts, and image.convert("RGB") makes a plain image that is accepted.
    if isinstance(image, ImageFile.ImageFile) and image.format not in IMAGE_FORMATS:
        raise SLQInputError(f"Cannot read image{_where(label)}: it was opened as {image.format}, which slq_hf does "
                            f"not decode (only {_names()}). Convert it yourself (image.convert('RGB')) if you trust "
                            "the file.")
    target = budget.target_size(image.width, image.height) if budget is not None and image.width and image.height \
        else None
    check_cost(image, target, label, decoded=not is_undecoded(image))


@dataclass(frozen=True)
class PendingImage:
    """An image checked from its header (exists, allowed format, size within limits) but not decoded yet.

    ``source`` is a path (re-opened when decoded, so thousands of pending images hold no open file) or a PIL image
    the caller gave; ``size`` is the stored (width, height), before EXIF orientation.
    """

    source: Path | Image.Image
    size: tuple[int, int]
    label: str | None = None

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


def pending_image(image: Image.Image | str | os.PathLike, label: str | None = None,
                  budget: ImageBudget | None = None) -> PendingImage:
    """Check an image input cheaply (header only, nothing decoded) and return it pending; SLQInputError naming
    ``label`` when it is missing, not an allowed format, empty or too large for ``budget``."""
    if isinstance(image, (str, os.PathLike)):
        with open_image(image, label) as opened:
            size = opened.size
            _plan(opened, budget, label)
        return PendingImage(Path(image).expanduser(), size, label)
    if not isinstance(image, Image.Image):
        raise SLQInputError(f"Expected a PIL image or an image path{_where(label)}, got {type(image).__name__}.")
    check_pil_image(image, budget, label)
    return PendingImage(image, image.size, label)


def decode_image(pending: PendingImage, budget: ImageBudget | None = None) -> Image.Image:
    """Decode a :class:`PendingImage` to RGB: EXIF orientation applied, shrunk to ``budget``, first frame only.

    Files are re-opened and re-checked (they may have changed since the header check). Raises SLQInputError naming
    the image for truncated or corrupt data.
    """
    label = pending.label
    if isinstance(pending.source, Image.Image):
        check_pil_image(pending.source, budget, label)
        try:
            return _finish(pending.source, budget)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # A PIL image given lazily: truncation shows only now.
            raise SLQInputError(f"Cannot decode image{_where(label)}: {err}. The image data is truncated or corrupt; "
                                "re-export it or drop it from the inputs.") from err
    with open_image(pending.source, label) as opened:
        target = _plan(opened, budget, label)
        try:
            opened.load()
            return _finish(opened, budget, target)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _unreadable(err, label) from err


def load_image(image: Image.Image | str | os.PathLike, index: int | None = None,
               budget: ImageBudget | None = None) -> Image.Image:
    """Open/convert an image to an RGB PIL image with EXIF orientation applied, checked and decoded right away.

    Args:
        image: a PIL image or the path of an image file.
        index: position of the input, named in errors.
        budget: shrink the image to this budget (:func:`image_budget`); JPEG files are then decoded at reduced
            scale, which is what makes huge photos cheap.

    Raises SLQInputError naming the input for missing, unreadable, truncated, empty, non-raster or too large images.
    """
    path = image if isinstance(image, (str, os.PathLike)) else None
    return decode_image(pending_image(image, image_label(index, path), budget), budget)


def image_label(index: int | None, path: Any = None) -> str | None:
    """How errors name an input: "input 3, file 'cat.jpg'"."""
    parts = []
    if index is not None:
        parts.append(f"input {index}")
    if path is not None:
        parts.append(f"file {str(path)!r}")
    return ", ".join(parts) if parts else None


def _finish(image: Image.Image, budget: ImageBudget | None, target: tuple[int, int] | None = None) -> Image.Image:
    # A new image either way (a copy when nothing rotates), so the caller may close the file after.
    stored = image.size
    method = _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))
    image = image.transpose(method) if method is not None else image.copy()
    if target is not None and image.size != stored:  # rotated by 90 degrees: the target turns with it
        target = (target[1], target[0])
    # Shrink before the mode conversion: converting a huge image is the other expensive step.
    image = fit_image(image, budget, target)
    return image if image.mode == "RGB" else _to_rgb(image)


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit grey (I;16*, I, F) -> L, min-max stretched over the finite pixels (+Inf white, -Inf and NaN black),
    a few rows at a time so the float copy stays small whatever the image size."""
    import numpy as np

    array = np.asarray(image)  # (H, W), the image's own dtype
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    valid = array[finite] if finite is not None else array
    low, high = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 0.0)
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, array.shape[0], _RESCALE_ROWS):
        rows = array[start : start + _RESCALE_ROWS].astype(np.float64)
        scaled = np.nan_to_num((np.clip(rows, low, high) - low) * scale, nan=0.0)
        scaled[np.isposinf(rows)] = 255.0  # brighter than every finite pixel, also in a flat image
        out[start : start + _RESCALE_ROWS] = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # uint8 (H, W) -> mode L


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels go on white (what a viewer shows); 16/32-bit greyscale is rescaled to 8 bit first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _rescale_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight-alpha twin
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
