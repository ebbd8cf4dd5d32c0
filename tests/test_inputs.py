"""Bad and unusual inputs: every kind gets a clear SLQInputError naming the input, or a documented conversion.

Covers ``SLQModel.encode`` (and the ``to_items``/``collate`` it is built on). The README's reliability section lists
the same matrix.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slq_hf.modeling.image_files as image_files
from slq_hf import SLQModel
from slq_hf.processing import (
    ImageBudget,
    SLQInputError,
    collate,
    fit_image,
    image_budget,
    load_image,
    prompt_length_limit,
    to_item,
    to_items,
)
from slq_hf.testing.tiny_backbones import TINY_FAMILIES

NUM_QUERIES = 4
# The tiny Qwen3-VL chat template's generation-prompt suffix: end of the user turn, then the assistant header.
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model(tiny_backbone_path):
    slq = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    with torch.no_grad():
        torch.nn.init.normal_(slq.queries, std=0.5)  # distinct queries, so different prompts give distinct outputs
    return slq


def _scene(width: int, height: int, colour=(255, 0, 0), mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(colour, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image.convert(mode) if mode != "RGB" else image


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------- files on disk
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    good = root / "good.jpg"
    _scene(64, 48).save(good, quality=95)
    paths["good"] = good
    # A noisy photo-sized JPEG cut in half: the header is intact (it opens), the pixel data is not (it won't decode).
    noisy = root / "noisy.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype="uint8")).save(noisy)
    truncated = root / "truncated.jpg"
    truncated.write_bytes(noisy.read_bytes()[: len(noisy.read_bytes()) // 2])
    paths["truncated"] = truncated
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    paths["corrupt"] = corrupt
    text_as_jpg = root / "notes.jpg"
    text_as_jpg.write_text("this is not an image")
    paths["not_image"] = text_as_jpg
    text_file = root / "notes.txt"
    text_file.write_text("plain text file")
    paths["txt"] = text_file
    empty = root / "empty.png"
    empty.write_bytes(b"")
    paths["empty"] = empty
    return paths


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated/corrupt"),
    ("corrupt", "not an image"),
    ("not_image", "not an image"),
    ("empty", "not an image"),
])
def test_unreadable_image_files_name_the_file_and_index(model, files, kind, message):
    inputs = ["a caption", files["good"], files[kind]]
    with pytest.raises(SLQInputError, match=message) as info:
        model.encode(inputs)
    assert "input 2" in str(info.value) and str(files[kind]) in str(info.value)
    # the same error through a {"image", "text"} pair and a plain path string
    with pytest.raises(SLQInputError, match="input 0"):
        model.encode([{"image": str(files[kind]), "text": "x"}])
    with pytest.raises(SLQInputError, match="input 1"):
        model.encode(["a", str(files[kind])])


def test_missing_paths(model, files, tmp_path):
    missing = tmp_path / "nowhere" / "cat.jpg"
    with pytest.raises(SLQInputError, match=r"input 1.*no such file|no such file.*input 1"):
        model.encode(["a", str(missing)])
    with pytest.raises(SLQInputError, match="not found") as info:
        model.encode([missing])  # a Path is always an image
    assert "input 0" in str(info.value) and "Check the path" in str(info.value)
    with pytest.raises(SLQInputError, match="not found"):
        model.encode([{"image": str(missing)}])


def test_str_is_text_unless_it_looks_like_a_path(model, files):
    """A path-like string naming a non-image file is refused (never embedded as text); so is a Path to it."""
    with pytest.raises(SLQInputError, match=r"input 0.*not an image slq_hf decodes"):
        model.encode([str(files["txt"])])
    assert model.encode([{"text": str(files["txt"])}]).shape == (1, 64)
    with pytest.raises(SLQInputError, match="Cannot read image"):
        model.encode([files["txt"]])
    # an existing image path string is the image itself, also with spaces in its name; a caption that merely ends
    # like a file name (and names no file) stays text
    _close(model.encode([str(files["good"])]), model.encode([Image.open(files["good"])]), atol=0)
    spaced = files["good"].with_name("my cat.jpg")
    spaced.write_bytes(files["good"].read_bytes())
    _close(model.encode([str(spaced)]), model.encode([Image.open(files["good"])]), atol=0)
    # a string ending like an image file name is a path: never silently embedded as text; {"text": ...} is text
    with pytest.raises(SLQInputError, match=r"no such file.*input 0.*\{'text': \.\.\.\}"):
        model.encode(["a photo saved as cat.jpg"])
    assert model.encode([{"text": "a photo saved as cat.jpg"}]).shape == (1, 64)
    # texts that cannot be paths at all (several lines, NUL byte inside) are just texts
    assert model.encode(["word " * 200 + "\nend.png", "nul\x00byte.jpg x"]).shape == (2, 64)


def test_decompression_bomb_refused_from_header_before_decoding(model, tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900M pixels claimed, 100 bytes on disk
    with pytest.raises(SLQInputError, match="too large to decode safely") as info:
        model.encode(["ok", bomb])
    assert "input 1" in str(info.value)
    # Below PIL's own limit but above ours (8000 x 9000 RGB = 275 MiB decoded > 256 MiB): refused from the header.
    moderate = _png_header_only(tmp_path / "moderate.png", 8_000, 9_000)
    with pytest.raises(SLQInputError, match="too large"):
        load_image(moderate)


def test_decoded_size_limit_applies_to_pil_images_too(model, monkeypatch):
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 4 * 1000)  # 1000 RGB pixels
    with pytest.raises(SLQInputError, match=r"too large.*input 0|input 0.*too large"):
        model.encode([_scene(40, 40)])
    assert model.encode([_scene(30, 30)]).shape == (1, 64)


def test_lazy_truncated_pil_image(model, files):
    """A PIL image opened lazily from a truncated file fails when decoded: still an SLQInputError naming it."""
    with pytest.raises(SLQInputError, match="input 1"):
        model.encode(["a", Image.open(files["truncated"])])


# ----------------------------------------------------------------------------------------------- image sizes
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 2), (2, 300)])
def test_tiny_images_embed(model, size):
    out = model.encode([_scene(*size)])
    assert out.shape == (1, 64) and torch.isfinite(out).all()


def test_extreme_aspect_ratio_is_a_clear_error_naming_the_input(model):
    """Qwen-VL's processor refuses aspect ratios >= 200 deep inside; we re-raise naming the user's index."""
    inputs = [_scene(64, 64), "text", _scene(4000, 10), "more text"]
    with pytest.raises(SLQInputError, match="aspect ratio") as info:
        model.encode(inputs, batch_size=4)
    assert "input 2" in str(info.value) and "crop or pad" in str(info.value)


def test_extreme_aspect_ratio_is_refused_before_any_batch_runs(model, tmp_path):
    """to_items checks every input before any work (its docstring): an image the processor's own size rule refuses
    fails there, from the file's header, naming its index (it was found only when its batch was collated, after the
    batches before it had run). Near the limit nothing changes: 199:1 and a shrunk 4000x21 pass."""
    from slq_hf.processing import image_budget, to_items

    budget = image_budget(model.processor)
    _scene(4020, 10).save(tmp_path / "strip.png")
    for bad in (tmp_path / "strip.png", _scene(10, 3000)):
        with pytest.raises(SLQInputError, match=r"input 1\).*refused by the backbone's processor.*aspect ratio"):
            to_items(["ok", bad], budget=budget)
    to_items([_scene(1990, 10), _scene(4000, 21)], budget=budget)
    assert model.encode([_scene(1990, 10), _scene(4000, 21)]).shape == (2, model.config.embedding_dim)

def test_large_image_is_shrunk_to_the_processor_budget_first(model):
    image_processor = model.processor.image_processor
    budget = image_budget(model.processor)
    assert (budget.max_pixels, budget.min_pixels, budget.unit) == (
        image_processor.size.longest_edge, image_processor.size.shortest_edge,
        image_processor.patch_size * image_processor.merge_size)
    big = _scene(3000, 2000, colour=(0, 200, 50))
    shrunk = fit_image(big, budget)
    assert shrunk.width * shrunk.height <= budget.max_pixels
    assert shrunk.width % budget.unit == 0 and shrunk.height % budget.unit == 0 and shrunk.width > shrunk.height
    # the batch the processor sees is the one of the pre-shrunk image, and so is the embedding
    seen = collate(model.processor, [to_item(big)])
    expected = collate(model.processor, [to_item(shrunk)])
    assert torch.equal(seen["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(seen["pixel_values"], expected["pixel_values"])
    _close(model.encode([big]), model.encode([shrunk]), atol=0)
    # ... and it has the token grid the processor gives the full-size image when asked directly
    direct = model.processor.image_processor(images=[big], return_tensors="pt")
    assert torch.equal(seen["image_grid_thw"], direct["image_grid_thw"])
    # images within the budget are untouched
    small = _scene(64, 64)
    assert fit_image(small, budget) is small


def test_huge_jpeg_decoded_at_reduced_scale(model, tmp_path):
    path = tmp_path / "huge.jpg"
    _scene(4000, 3000).save(path, quality=80)
    budget = image_budget(model.processor)
    loaded = load_image(path, budget=budget)
    assert loaded.mode == "RGB" and loaded.width * loaded.height <= budget.max_pixels
    with Image.open(path) as reference:
        # draft() asks libjpeg for a 1/8-scale decode; the result must match PIL's own reduced decode closely
        reference.draft("RGB", (500, 375))
        assert reference.size == (500, 375)
    assert model.encode([path]).shape == (1, 64)


def test_budget_shrink_keeps_aspect_ratio_below_qwen_limit():
    """Rounding never makes the aspect ratio worse (a 199:1 image must stay processable)."""
    for budget in (ImageBudget(max_pixels=16384), ImageBudget(max_short_side=20), ImageBudget(max_long_side=500)):
        for width, height in [(19900, 100), (100, 19900), (5971, 30), (30001, 151)]:
            shrunk = fit_image(Image.new("L", (width, height)), budget)
            assert max(shrunk.size) / min(shrunk.size) <= max(width, height) / min(width, height)


def _image_processors() -> dict:
    import transformers

    return {
        "clip (shortest edge + crop)": transformers.CLIPImageProcessor(),
        "llava-next (pinpoint tiles)": transformers.LlavaNextImageProcessor(),
        "internvl (crop to patches)": transformers.GotOcr2ImageProcessor(crop_to_patches=True, max_patches=4),
        "idefics3 (longest edge + split)": transformers.Idefics3ImageProcessor(),
        "gemma3 (fixed size)": transformers.Gemma3ImageProcessor(),
        "qwen-vl (pixel budget)": transformers.Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, size={"shortest_edge": 1024, "longest_edge": 16384}),
    }


@pytest.mark.parametrize("name", list(_image_processors()))
def test_shrinking_does_not_change_what_each_processor_produces(name):
    """For every kind of resize rule, the pre-shrunk image gives the processor output of the same shape (tiles,
    token grid) as the full image; only the pixel values differ by the resampling."""
    from types import SimpleNamespace

    image_processor = _image_processors()[name]
    budget = image_budget(SimpleNamespace(image_processor=image_processor))
    assert budget is not None
    shrunk_any = False
    for width, height in [(4000, 3100), (3100, 4000), (1200, 1200)]:
        image = _scene(width, height, colour=(10, 200, 30))
        shrunk = fit_image(image, budget)
        shrunk_any |= shrunk.size != image.size
        full = image_processor(images=[image], return_tensors="pt")
        small = image_processor(images=[shrunk], return_tensors="pt")
        assert full["pixel_values"].shape == small["pixel_values"].shape, (width, height)
        if "image_grid_thw" in full:
            assert torch.equal(full["image_grid_thw"], small["image_grid_thw"])
    assert shrunk_any


# ---------------------------------------------------------------------------------------------- image modes
def _rgba_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


@pytest.mark.parametrize("mode", ["L", "1", "LA", "La", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
                                  "I", "I;16", "I;16B", "F"])
def test_every_pil_mode_becomes_rgb(model, mode):
    source = _scene(48, 32, colour=(250, 10, 10))
    if mode in ("I", "I;16", "I;16B", "F"):
        # a horizontal gradient over most of the 16-bit range (or 0..1 for float images)
        array = np.linspace(0, 60000 if mode != "F" else 1.0, 48 * 32).reshape(32, 48)
        dtype = {"I": "<i4", "I;16": "<u2", "I;16B": ">u2", "F": "<f4"}[mode]
        image = Image.frombytes(mode, (48, 32), array.astype(dtype).tobytes())
    else:
        image = source.convert(mode)
    assert image.mode == mode
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (48, 32)
    out = model.encode([image])
    assert torch.isfinite(out).all()
    _close(out, model.encode([rgb]), atol=0)
    if mode.startswith("I") or mode == "F":
        # high bit depth is rescaled to the full 8-bit range (not clipped at 255, which would give a white image)
        values = np.asarray(rgb)[..., 0]
        assert values.min() == 0 and values.max() == 255


def test_transparency_composited_on_white(model):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (8, 8, 24, 24))  # opaque blue square
    rgb = load_image(rgba)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((16, 16)) == (0, 0, 255)
    _close(model.encode([rgba]), model.encode([_rgba_on_white(rgba)]), atol=0)


def test_palette_with_transparency(model):
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (4, 4, 12, 12))
    palette.info["transparency"] = 0
    rgb = load_image(palette)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((8, 8)) == (0, 255, 0)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_is_transposed(model, tmp_path, orientation):
    # Left half red, right half blue, stored 64x32; EXIF says how a viewer must rotate it.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated_{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    expected_size = (64, 32) if orientation == 3 else (32, 64)
    assert loaded.size == expected_size
    red_at = {3: (48, 16), 6: (16, 8), 8: (16, 56)}[orientation]  # where the red half lands after the rotation
    red, _, blue = loaded.getpixel(red_at)
    assert red > 200 and blue < 60
    with Image.open(path) as raw:
        raw.load()
        rotated = raw.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
                                 8: Image.Transpose.ROTATE_90}[orientation])
        manual = Image.fromarray(np.asarray(rotated))  # pixels only: the EXIF tag must not rotate it again
    _close(model.encode([path]), model.encode([manual]), atol=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_photo_with_a_mistyped_exif_tag_is_still_transposed(model, tmp_path, fmt):
    """Cameras write odd EXIF: here TileWidth (a LONG tag) holds a string. PIL's exif_transpose rotates, then fails
    writing the EXIF back (struct.error, a crash of encode and of training); the orientation alone decides."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Camera"  # orientation 6, Make
    raw = exif.tobytes()
    mistyped = raw
    for order in "<>":  # Make -> TileWidth, in whichever byte order PIL wrote
        mistyped = mistyped.replace(struct.pack(f"{order}HH", 0x010F, 2), struct.pack(f"{order}HH", 0x0142, 2))
    assert mistyped != raw
    path = tmp_path / f"odd_exif.{fmt.lower()}"
    stored.save(path, fmt, exif=mistyped, **({"lossless": True} if fmt == "WEBP" else {"quality": 95}))
    manual = Image.fromarray(np.asarray(Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    assert load_image(path).size == (32, 64)
    _close(model.encode([path]), model.encode([manual]), atol=0)


# ----------------------------------------------------------------------------------------------------- texts
@pytest.mark.parametrize("text", ["", " ", "\n\t  "])
def test_empty_or_whitespace_text(model, text):
    with pytest.raises(SLQInputError, match=r"empty or whitespace.*input 1"):
        model.encode(["ok", text])
    with pytest.raises(SLQInputError, match="input 0"):
        model.encode([{"image": _scene(32, 32), "text": text}])


@pytest.mark.parametrize("instruction", [5, b"find it", ["a"]])
def test_instruction_must_be_text(model, instruction):
    with pytest.raises(SLQInputError, match="instruction= must be a str"):
        model.encode(["ok"], instruction=instruction)


@pytest.mark.parametrize("input_ids", [torch.tensor([1, 2]), torch.ones(1, 3), torch.zeros(0, 0, dtype=torch.long),
                                       torch.ones(1, 2, 3, dtype=torch.long)])
def test_forward_refuses_ids_that_are_not_a_batch_of_token_ids(model, input_ids):
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, length\) tensor of token ids"):
        model(input_ids=input_ids)


def _suffix_ids(processor) -> list[int]:
    return processor.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]


def test_long_text_truncated_with_warning_keeping_the_generation_prompt(model, monkeypatch):
    # A 64-token tokenizer limit keeps the test fast; the backbone's max_position_embeddings works the same way.
    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", 64)
    limit = model.max_prompt_length()
    assert limit == 64 - NUM_QUERIES
    long_text = "the quick brown fox jumps over " * 40
    with pytest.warns(UserWarning, match=r"too long.*Kept the first") as record:
        out = model.encode(["short", long_text, {"image": _scene(64, 64), "text": long_text}], batch_size=3)
    assert sorted(str(w.message)[:13] for w in record) == ["Text (input 1", "Text (input 2"]
    assert torch.isfinite(out).all()
    items = to_items([long_text])
    with pytest.warns(UserWarning):
        batch = collate(model.processor, items, max_length=limit)
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    suffix = _suffix_ids(model.processor)
    assert len(ids) <= limit and ids[-len(suffix):] == suffix
    # the truncated prompt starts like the full one (the text is cut at its end, not its start)
    full = collate(model.processor, items)["input_ids"][0].tolist()
    assert ids[: len(ids) - len(suffix)] == full[: len(ids) - len(suffix)]
    # short texts are untouched and give no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(["short text"])


def test_long_text_limit_from_backbone_positions(model):
    limit = prompt_length_limit(model.backbone.config, model.processor, reserved=NUM_QUERIES)
    assert limit == model.backbone.config.get_text_config().max_position_embeddings - NUM_QUERIES
    assert model.max_prompt_length() == limit


def test_prompt_that_cannot_fit_is_refused(model, monkeypatch):
    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", NUM_QUERIES + 6)
    with pytest.raises(SLQInputError, match=r"input 0.*smaller image|image input.*input 0"):
        model.encode([_scene(64, 64)])
    with pytest.raises(SLQInputError, match="even without its text"):
        model.encode(["some words here"], instruction="a long instruction that alone is longer than the limit")


# ------------------------------------------------------------------------------------------- structure/types
@pytest.mark.parametrize("value, message", [
    (None, "Input is None"),
    (["a", "b"], "Nested list"),
    (("a",), "Nested tuple"),
    ([], "Nested list"),
    (42, "Unsupported input type int"),
    (b"bytes", "Unsupported input type bytes"),
    (np.zeros((4, 4, 3), dtype="uint8"), "Image.fromarray"),
    ({"img": "x"}, "Unknown keys"),
    ({}, "neither 'image' nor 'text'"),
    ({"image": None, "text": None}, "neither 'image' nor 'text'"),
    ({"image": 3}, "Expected a PIL image or an image path"),
    ({"text": 3}, "Expected text as str"),
])
def test_wrong_types_name_the_index(model, value, message):
    with pytest.raises(SLQInputError, match=message) as info:
        model.encode(["fine", _scene(32, 32), value])
    assert "input 2" in str(info.value)


def test_not_a_list(model):
    with pytest.raises(SLQInputError, match="Expected a list of inputs, got int"):
        model.encode(5)
    assert model.encode("single text").shape == (1, 64)  # one input is wrapped into a list


def test_empty_list_returns_zero_rows(model):
    out = model.encode([])
    assert out.shape == (0, 64) and out.dtype == torch.float32
    assert to_items([]) == []
    with pytest.raises(SLQInputError, match="empty batch"):
        collate(model.processor, [])


def test_mixed_batch_of_all_kinds_matches_one_by_one(model, files):
    rgba = _scene(40, 30, mode="RGBA")
    inputs = [
        "a caption",
        _scene(64, 48),
        str(files["good"]),
        files["good"],
        {"image": _scene(96, 64, colour=(0, 0, 255)), "text": "what shape is this?"},
        {"text": "a text in a dict"},
        {"image": str(files["good"])},
        rgba,
        _scene(1, 1),
        _scene(700, 500),
        "  leading and trailing spaces are kept  ",
    ]
    batched = model.encode(inputs, batch_size=len(inputs))
    assert batched.shape == (len(inputs), 64)
    for index, value in enumerate(inputs):
        _close(batched[index : index + 1], model.encode([value]))
    # the string path, the Path, the dict image and the PIL decode of the same file are one input
    _close(batched[2], batched[3], atol=0)
    _close(batched[2], batched[6], atol=0)


# ------------------------------------------------------------------------------------------ training collator
def test_collator_skips_and_counts_every_kind_of_bad_example(model, files):
    from slq_hf.training import SLQDataCollator

    collator = SLQDataCollator(model.processor, max_length=model.max_prompt_length())
    good = {"image": _scene(64, 64), "text": "a red square", "_source": "good:1"}
    bad = [
        {"image": str(files["truncated"]), "text": "x", "_source": "bad:truncated"},
        {"image": str(files["not_image"]), "text": "x", "_source": "bad:not-image"},
        {"image": "missing/nowhere.jpg", "text": "x", "_source": "bad:missing"},
        {"image": _scene(32, 32), "text": "   ", "_source": "bad:blank-text"},
        {"image": _scene(4000, 10), "text": "x", "_source": "bad:aspect"},  # refused by the processor itself
        {"query": None, "positive": "x", "_source": "bad:none"},
    ]
    batch = collator([good, *bad, {**good, "_source": "good:2"}])
    assert batch["input_ids"].shape[0] == 2 and batch["positive_input_ids"].shape[0] == 2
    assert collator.num_skipped == len(bad)
    reasons = {s.source: s.reason for s in collator.skipped}
    assert set(reasons) == {b["_source"] for b in bad}
    assert "aspect ratio" in reasons["bad:aspect"] and "empty or whitespace" in reasons["bad:blank-text"]
    assert "not an image" in reasons["bad:not-image"] and "not found" in reasons["bad:missing"]

    strict = SLQDataCollator(model.processor, strict=True)
    with pytest.raises(SLQInputError, match=r"example 1 of the batch \(bad:aspect\).*strict=True"):
        strict([good, bad[4]])
    with pytest.raises(SLQInputError, match="All 2 examples"):
        collator(bad[:2])


def test_collator_truncates_long_texts_and_shrinks_huge_images(model, monkeypatch, tmp_path):
    from slq_hf.training import SLQDataCollator, SLQTrainer

    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", 64)
    big = tmp_path / "big.jpg"
    _scene(3000, 2000).save(big)
    collator = SLQDataCollator(model.processor)
    # SLQTrainer fills in the model's limit, so training truncates exactly like encode
    from transformers import TrainingArguments

    SLQTrainer(model=model, args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to="none"),
               train_dataset=[], data_collator=collator)
    assert collator.max_length == model.max_prompt_length() == 64 - NUM_QUERIES
    long_text = "the quick brown fox jumps over " * 40
    with pytest.warns(UserWarning, match="too long"):
        batch = collator([{"image": str(big), "text": long_text}, {"image": _scene(64, 64), "text": "short"}])
    mask = batch["positive_attention_mask"].bool()
    assert mask.sum(dim=1).max() <= collator.max_length
    suffix = _suffix_ids(model.processor)
    first = batch["positive_input_ids"][0][mask[0]].tolist()
    assert first[-len(suffix):] == suffix
    budget = image_budget(model.processor)
    assert torch.equal(batch["image_grid_thw"][0], collate(model.processor, [to_item(big, budget=budget)])[
        "image_grid_thw"][0])


# ------------------------------------------------------------------------------------------ sentence-transformers
@pytest.fixture(scope="module")
def sentence_model(model, tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    folder = tmp_path_factory.mktemp("st") / "slq"
    model.save_pretrained(folder)
    return SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def test_sentence_transformers_with_prepare_inputs_matches_encode(model, sentence_model, files, tmp_path):
    from slq_hf.processing import prepare_inputs

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    _scene(64, 32).save(rotated, exif=exif)
    high_depth = Image.frombytes("I;16", (40, 30), np.linspace(0, 60000, 1200).astype("<u2").tobytes())
    inputs = ["a caption", str(files["good"]), rotated, high_depth, _scene(48, 48, mode="CMYK"), _scene(1, 1),
              _scene(3000, 2000), {"image": _scene(96, 64, mode="RGBA"), "text": "what shape?"},
              {"text": str(files["good"])}]  # a text naming an existing image file stays a text
    prepared = prepare_inputs(inputs, sentence_model[0].processor)
    assert [type(p).__name__ for p in prepared] == ["dict", "Image", "Image", "Image", "Image", "Image", "Image",
                                                    "dict", "dict"]
    assert prepared[0] == {"text": "a caption"} and prepared[-1] == {"text": str(files["good"])}
    assert all(p.mode == "RGB" for p in prepared if isinstance(p, Image.Image))
    got = sentence_model.encode(prepared, convert_to_tensor=True, batch_size=3)
    _close(got, model.encode(inputs))
    for value, message in [(None, r"None \(input 1\)"), (files["corrupt"], "input 1"), ("", r"empty.*input 1"),
                           (["a", "b"], r"Nested list \(input 1\)")]:
        with pytest.raises(SLQInputError, match=message):
            prepare_inputs(["ok", value])


def test_sentence_transformers_truncation_matches_encode(model, sentence_model, monkeypatch):
    """With max_seq_length set to the model's prompt limit, sentence-transformers truncates long texts and restores
    the chat-template suffix: the same prompt, hence the same embedding, as SLQModel.encode."""
    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", 44)
    limit = model.max_prompt_length()
    monkeypatch.setattr(sentence_model, "max_seq_length", limit)
    long_text = "the quick brown fox jumps over " * 40
    features = sentence_model[0].preprocess([long_text])
    ids = features["input_ids"][0][features["attention_mask"][0].bool()].tolist()
    suffix = _suffix_ids(model.processor)
    assert len(ids) == limit and ids[-len(suffix):] == suffix
    with pytest.warns(UserWarning, match="too long"):
        expected = model.encode([long_text])
    _close(sentence_model.encode([long_text], convert_to_tensor=True), expected)


# --------------------------------------------------------------------------------------------- every family
def _common_tail(a: list[int], b: list[int]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return count


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_edge_inputs_on_every_backbone_family(tiny_backbone_path, family, monkeypatch):
    """The same conversions on every processor family: tiny/huge/transparent/16-bit images and over-long texts
    (truncated keeping the family's own chat-template tail) in one batch, each row equal to the input alone."""
    slq = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES)
    monkeypatch.setattr(slq.processor.tokenizer, "model_max_length", 200)
    long_text = "the quick brown fox jumps over " * 60
    inputs = ["hello", _scene(1, 1), _scene(3000, 2000), _scene(50, 40, mode="RGBA"),
              Image.frombytes("I;16", (30, 30), np.arange(900, dtype="<u2").tobytes()), long_text,
              {"image": _scene(64, 64), "text": long_text}]
    with pytest.warns(UserWarning, match="too long"):
        together = slq.encode(inputs, batch_size=len(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        alone = torch.cat([slq.encode([value]) for value in inputs])
    assert torch.isfinite(together).all()
    _close(together, alone)

    def prompt(text: str) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            batch = collate(slq.processor, to_items([text]), max_length=slq.max_prompt_length())
        return batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()

    tail = _common_tail(prompt("a b c"), prompt("hello world"))
    assert tail >= 2  # end of turn + assistant header
    truncated = prompt(long_text)
    assert len(truncated) <= slq.max_prompt_length() and truncated[-tail:] == prompt("a b c")[-tail:]


def test_saved_folder_makes_plain_sentence_transformers_truncate_like_encode(model, monkeypatch, tmp_path):
    """save_pretrained caps sentence_bert_config's max_seq_length at the model's prompt limit, so a plain
    SentenceTransformer(folder) truncates over-long texts exactly like encode, chat-template tail included."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    monkeypatch.setattr(model.processor.tokenizer, "model_max_length", 44)
    model.save_pretrained(tmp_path / "slq")
    st_model = SentenceTransformer(str(tmp_path / "slq"), trust_remote_code=True, device="cpu")
    assert st_model.max_seq_length == model.max_prompt_length() == 44 - NUM_QUERIES
    long_text = "the quick brown fox jumps over " * 40
    with pytest.warns(UserWarning, match="too long"):
        expected = model.encode(["short text", long_text])
    _close(st_model.encode(["short text", long_text], convert_to_tensor=True), expected)


# ------------------------------------------------------------------------------------------- path-guess rule
@pytest.mark.parametrize("value, message", [
    ("photos/", "no such file"),
    ("my cat.jpg", "no such file"),
    ("  holiday.PNG ", "no such file"),
    ("https://example.com/cat.jpg", "is a URL"),
])
def test_path_like_strings_are_never_embedded_as_text(model, value, message):
    from slq_hf.training import SLQDataCollator

    with pytest.raises(SLQInputError, match=message) as info:
        model.encode(["ok", value])
    assert "input 1" in str(info.value) and "{'text': ...}" in str(info.value)
    with pytest.raises(SLQInputError, match=message):
        from slq_hf.processing import prepare_inputs

        prepare_inputs(["ok", value])
    collator = SLQDataCollator(model.processor, strict=True)
    with pytest.raises(SLQInputError, match=message):
        collator([{"query": value, "positive": "a caption"}])
    # the escape hatch: the same string as an explicit text
    assert model.encode([{"text": value}]).shape == (1, 64)


def test_existing_folders_and_files_named_by_path_are_refused(model, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    for value, message in [(str(folder), "is a folder"), ("photos/", "is a folder"), ("./photos", "is a folder"),
                           ("./notes.txt", "not an image slq_hf decodes")]:
        with pytest.raises(SLQInputError, match=message):
            model.encode([value])
    with pytest.raises(SLQInputError, match="is a folder"):
        model.encode([folder])  # a Path is always an image
    # bare words, even when a folder of that name exists here, and texts with a slash are texts
    assert model.encode(["photos", "notes.txt", "and/or", "a photo of a cat"]).shape == (4, 64)
    # an image file without an image extension, named by a path, is the image
    Image.new("RGB", (20, 20), "red").save(tmp_path / "picture", "PNG")
    torch.testing.assert_close(model.encode(["./picture"]), model.encode([Image.new("RGB", (20, 20), "red")]),
                               atol=0, rtol=0)


def test_lazy_items_decode_only_in_collate(model, files):
    items = to_items([str(files["good"]), Image.open(files["good"]), "text"], image_budget(model.processor))
    assert [type(item.image).__name__ for item in items] == ["PendingImage", "PendingImage", "NoneType"]
    assert items[0].length_key() == items[1].length_key()  # header size: no decode needed to sort
    eager = to_items([str(files["good"])], image_budget(model.processor), lazy=False)
    assert eager[0].image.mode == "RGB"
    assert torch.equal(collate(model.processor, items[:1])["pixel_values"],
                       collate(model.processor, eager)["pixel_values"])
    # a file that turns bad after the header check fails at collate time, still naming the input
    truncated = files["truncated"]
    pending = to_items(["a", str(truncated)])
    with pytest.raises(SLQInputError, match="input 1"):
        collate(model.processor, pending)


# ------------------------------------------------------------------------------------------ sentence-transformers
def test_sentence_transformers_helpers_take_inputs_like_encode(model, tmp_path):
    """EXIF-rotated PIL images, animated GIF paths and zero-size images: plain sentence-transformers differs or
    crashes; models from load_sentence_transformer (use_encode_input_handling) agree with encode or raise its error."""
    pytest.importorskip("sentence_transformers")
    from slq_hf.integrations.sentence_transformers import load_sentence_transformer

    model.save_pretrained(tmp_path / "slq")
    st = load_sentence_transformer(tmp_path / "slq", device="cpu")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ["red", "blue", "green"]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    stored.save(tmp_path / "rot.jpg", exif=exif)
    inputs = [str(tmp_path / "anim.gif"), Image.open(tmp_path / "rot.jpg"), tmp_path / "rot.jpg", "a caption",
              {"image": _scene(40, 30, mode="RGBA"), "text": "what?"}, {"text": str(tmp_path / "rot.jpg")}]
    _close(st.encode(inputs, convert_to_tensor=True, batch_size=2), model.encode(inputs))
    # still picklable (multi-process pools send the model to workers), and the copy keeps encode's handling
    import pickle

    copy = pickle.loads(pickle.dumps(st))
    _close(copy.encode(inputs[:3], convert_to_tensor=True), model.encode(inputs[:3]))
    for value, message in [(Image.new("RGB", (0, 5)), "zero size"), ("", "empty or whitespace"),
                           ("missing/cat.jpg", "no such file"), (None, "Input is None"), (3.5, "Unsupported")]:
        # ST sorts inputs by length before preprocessing; the error still names the position the caller gave
        for encode in (st.encode, st.encode_query, st.encode_document, copy.encode):
            with pytest.raises(SLQInputError, match=rf"{message}.*input 2\b|input 2\b.*{message}"):
                encode(["ok", "a much longer text than the first one", value, "z"], batch_size=2)


@pytest.mark.parametrize("text", ["ab\ud800cd", "\udfff"])
def test_text_that_is_not_valid_unicode_names_the_input(model, text):
    """A lone surrogate (json.loads lets "\\ud800" through) is refused naming the input, not a tokenizer TypeError."""
    from slq_hf.processing import prepare_inputs

    for call in (lambda: model.encode(["ok", text]), lambda: prepare_inputs(["ok", text], model.processor),
                 lambda: model.encode(["ok"], instruction=text)):
        with pytest.raises(SLQInputError, match="not valid Unicode"):
            call()
    with pytest.raises(SLQInputError, match=r"Text \(input 1\) is not valid Unicode"):
        model.encode(["ok", {"text": text}])
    from slq_hf.training import SLQDataCollator

    collator = SLQDataCollator(model.processor)  # training skips and counts it, like other bad examples
    batch = collator([{"query": text, "positive": "x"}, {"query": "a", "positive": "b"},
                      {"query": "c", "positive": "d"}])
    assert batch["input_ids"].shape[0] == 2 and "not valid Unicode" in collator.skipped[0].reason


def test_prepare_inputs_refuses_what_encode_refuses(model):
    from slq_hf.processing import prepare_inputs

    for size in [(1, 300), (3000, 2)]:
        with pytest.raises(SLQInputError, match=r"input 1\).*aspect ratio"):
            model.encode(["ok", _scene(*size)])
        with pytest.raises(SLQInputError, match=r"input 1\).*aspect ratio"):
            prepare_inputs(["ok", _scene(*size)], model.processor)
