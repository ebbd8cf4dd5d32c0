"""No image input runs a program or eats the machine: format allowlist, per-call decoded-size limit, bounded decode.

Covers every place an image is opened: ``SLQModel.encode``, ``prepare_inputs``, the training collator (paths and
``datasets`` byte records), evaluation's ``encode_inputs`` and caller-opened (lazy) PIL images.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slq_hf.modeling.image_files as image_files
from slq_hf import SLQModel
from slq_hf.processing import ImageBudget, SLQInputError, decode_image, load_image, pending_image, prepare_inputs

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture(scope="module")
def model(tiny_backbone_path):
    return SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=4)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> Path:
    """A PNG whose header claims width x height pixels with almost no data (colour type 0 grey, 2 RGB, 3 palette,
    6 RGBA)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    palette = _chunk(b"PLTE", b"\0\0\0" * 4) if colour_type == 3 else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + palette
                     + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b""))
    return path


def non_raster_files(root: Path) -> dict[str, Path]:
    """Files PIL can open (or that look like images by name) but slq_hf must never decode, under image names."""
    files = {}
    files["eps as photo.png"] = root / "photo.png"
    files["eps as photo.png"].write_bytes(EPS)
    files["eps as scan.jpg"] = root / "scan.jpg"
    files["eps as scan.jpg"].write_bytes(EPS)
    pdf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(pdf, "PDF")
    files["pdf as doc.png"] = root / "doc.png"
    files["pdf as doc.png"].write_bytes(pdf.getvalue())
    files["svg as logo.png"] = root / "logo.png"
    files["svg as logo.png"].write_text('<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>')
    for fmt, name in [("PPM", "frame.bmp"), ("ICO", "icon.gif"), ("TGA", "art.tif"), ("PCX", "old.webp")]:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "blue").save(buffer, fmt)
        files[f"{fmt.lower()} as {name}"] = root / name
        files[f"{fmt.lower()} as {name}"].write_bytes(buffer.getvalue())
    return files


def test_non_raster_files_are_refused_everywhere_and_ghostscript_never_runs(model, tmp_path, fake_ghostscript):
    from slq_hf.evaluation.encoding import encode_inputs
    from slq_hf.training import SLQDataCollator

    files = non_raster_files(tmp_path)
    collator = SLQDataCollator(model.processor, strict=True)
    for name, path in files.items():
        calls = {
            "encode str": lambda p=path: model.encode(["ok", str(p)]),
            "encode Path": lambda p=path: model.encode(["ok", p]),
            "encode dict": lambda p=path: model.encode(["ok", {"image": str(p), "text": "x"}]),
            "encode lazy PIL": lambda p=path: model.encode(["ok", Image.open(p)]),
            "prepare_inputs": lambda p=path: prepare_inputs(["ok", p], model.processor),
            "collator path": lambda p=path: collator([{"image": str(p), "text": "x"}]),
            "collator bytes": lambda p=path: collator([{"image": {"bytes": p.read_bytes(), "path": p.name},
                                                        "text": "x"}]),
            "eval": lambda p=path: encode_inputs(model, [p], show_progress_bar=False),
        }
        for where, call in calls.items():
            if where == "encode lazy PIL":
                try:
                    Image.open(path)
                except Image.UnidentifiedImageError:
                    continue  # PIL itself cannot open it: nothing lazy to pass
            with pytest.raises(SLQInputError) as info:
                call()
            message = str(info.value)
            assert "not an image slq_hf decodes" in message or "does not decode" in message, (name, where, message)
            if where.startswith("encode") and where != "encode lazy PIL":
                assert "input 1" in message and path.name in message, (name, where, message)
    assert not fake_ghostscript.exists()
    # Positive control: PIL on its own does run the fake `gs` for the EPS file (so the marker would have shown it).
    with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises once Ghostscript "fails"
        with Image.open(files["eps as photo.png"]) as raw:
            raw.load()
    assert fake_ghostscript.exists()


def test_allowed_formats_all_decode(model, tmp_path):
    scene = Image.new("RGB", (40, 30), (200, 30, 30))
    reference = model.encode([scene])
    for fmt, name in [("PNG", "a.png"), ("BMP", "a.bmp"), ("TIFF", "a.tif"), ("WEBP", "a.webp"), ("GIF", "a.gif")]:
        path = tmp_path / name
        scene.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out = model.encode([str(path)])
        if fmt != "GIF":  # GIF quantises to a palette; the lossless formats give back the same pixels
            torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
        assert torch.isfinite(out).all()


def test_pil_global_limit_is_never_changed_even_under_concurrent_loads(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    good = tmp_path / "good.png"
    Image.new("RGB", (300, 200), "green").save(good)
    bomb = png_header(tmp_path / "bomb.png", 9000, 9000)  # 81M px: below PIL's limit, above ours
    seen: set = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    def work() -> None:
        for _ in range(20):
            load_image(good)
            with pytest.raises(SLQInputError, match="too large"):
                load_image(bomb)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=work) for _ in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    watcher.join()
    assert seen == {before} and Image.MAX_IMAGE_PIXELS == before


def test_library_limit_holds_when_pil_limit_is_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller who turned PIL's own guard off
    with pytest.raises(SLQInputError, match="too large to decode safely"):
        load_image(png_header(tmp_path / "bomb.png", 30_000, 30_000))


# One row per (format, mode): bytes PIL holds per decoded pixel, computed here by hand from PIL's storage layout.
HEADER_CASES = [
    ("rgb8", dict(bit_depth=8, colour_type=2), 4),
    ("rgb16", dict(bit_depth=16, colour_type=2), 4),  # PIL keeps 16-bit RGB as 8-bit RGB
    ("rgba8", dict(bit_depth=8, colour_type=6), 4),
    ("grey8", dict(bit_depth=8, colour_type=0), 1),
    ("grey16", dict(bit_depth=16, colour_type=0), 2),  # mode I;16
    ("palette", dict(bit_depth=8, colour_type=3), 1),
]


@pytest.mark.parametrize("name, header, per_pixel", HEADER_CASES)
def test_decoded_size_threshold_is_exact_from_the_header(tmp_path, monkeypatch, name, header, per_pixel):
    width, height = 300, 200
    path = png_header(tmp_path / f"{name}.png", width, height, **header)
    # With a budget that shrinks to 50x50, the cost is the decode itself (max(decode, 4 x output pixels)).
    budget = ImageBudget(max_long_side=50)
    needed = max(width * height * per_pixel, 50 * 34 * 4)
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", needed)
    pending_image(path, budget=budget)  # exactly at the limit: accepted (header only, nothing decoded)
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", needed - 1)
    with pytest.raises(SLQInputError, match="too large"):
        pending_image(path, budget=budget)
    # Without a budget the RGB result (4 bytes a pixel) is the larger cost.
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", width * height * 4 - 1)
    with pytest.raises(SLQInputError, match="too large"):
        pending_image(path)


def test_jpeg_reduced_scale_decode_is_what_counts(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(path, quality=70)
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 8 * 2**20)  # full decode needs 4000*3000*4 = 46 MiB
    with pytest.raises(SLQInputError, match="too large"):
        load_image(path)
    budget = ImageBudget(max_pixels=250_000)  # draft to 1/8 scale: 500x375, 0.7 MiB
    image = load_image(path, budget=budget)
    # about 250k pixels (the budget rounds the short side up), from a 1/8-scale decode
    assert image.mode == "RGB" and image.width * image.height <= 251_000


def _frames(size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in [(250, 0, 0), (0, 0, 250), (0, 250, 0), (250, 250, 0)]]


@pytest.mark.parametrize("fmt, name", [("GIF", "anim.gif"), ("PNG", "anim.png"), ("TIFF", "pages.tif"),
                                       ("WEBP", "anim.webp")])
def test_animations_and_multi_page_files_decode_the_first_frame_only(model, tmp_path, monkeypatch, fmt, name):
    frames = _frames((40, 30))
    path = tmp_path / name
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:],
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as opened:
        assert getattr(opened, "n_frames", 1) == 4  # really an animation
    # A limit of exactly one frame's RGB size is enough: frames do not multiply the cost.
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 40 * 30 * 4)
    loaded = load_image(path)
    assert loaded.size == (40, 30) and loaded.getpixel((5, 5))[0] > 200 and loaded.getpixel((5, 5))[2] < 50
    torch.testing.assert_close(model.encode([path]), model.encode([load_image(path)]), atol=0, rtol=0)


def test_multi_page_tiff_with_a_huge_second_page_costs_the_first_page(tmp_path, monkeypatch):
    path = tmp_path / "pages.tif"
    Image.new("RGB", (40, 30), "red").save(path, save_all=True, append_images=[Image.new("RGB", (2000, 2000))])
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 40 * 30 * 4)
    assert load_image(path).size == (40, 30)


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I", "<i4"), ("F", "<f4")])
def test_high_bit_depth_rescale_equals_the_whole_image_formula(mode, dtype):
    """The chunked 16/32-bit rescale equals the one-shot min-max formula (NaN -> 0 for floats)."""
    rows = image_files._RESCALE_ROWS * 2 + 7  # several chunks and a partial one
    array = np.random.default_rng(0).integers(100, 60000, (rows, 9)).astype(dtype)
    if mode == "F":
        array[3, 4] = np.nan
    image = Image.frombytes(mode, (9, rows), array.tobytes())
    got = np.asarray(load_image(image))[..., 0]
    values = array.astype("float64")
    finite = values[np.isfinite(values)]
    expected = np.nan_to_num((values - finite.min()) * (255.0 / (finite.max() - finite.min())), nan=0.0)
    assert np.abs(got.astype(int) - expected.astype("uint8").astype(int)).max() == 0


@pytest.mark.parametrize("finite_values, expected_finite", [
    ([10.0, 20.0, 30.0], [0, 127, 255]),  # stretched over the finite pixels
    ([5.0, 5.0, 5.0], [0, 0, 0]),  # a flat image: nothing to stretch
    ([], []),  # no finite pixel at all
])
def test_float_image_infinities_are_white_and_black_not_all_black(finite_values, expected_finite):
    """+Inf is brighter than every finite pixel (white), -Inf darker (black), NaN black; the finite pixels keep
    their stretch, so one +Inf pixel neither darkens itself nor the rest of the image."""
    values = np.array([*finite_values, np.inf, -np.inf, np.nan, np.inf], dtype="<f4")
    image = Image.frombytes("F", (values.size, 1), values.tobytes())
    got = np.asarray(load_image(image))[0, :, 0].tolist()
    assert got == [*expected_finite, 255, 0, 0, 255]


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_zero_size_pil_images_refused_naming_the_input(model, size):
    with pytest.raises(SLQInputError, match=r"zero size.*input 1"):
        model.encode(["ok", Image.new("RGB", size)])


def test_pending_image_then_changed_file_is_rechecked(tmp_path, monkeypatch):
    path = tmp_path / "swap.png"
    Image.new("RGB", (20, 20)).save(path)
    pending = pending_image(path, "input 0")
    png_header(path, 30_000, 30_000)  # replaced by a bomb between the check and the decode
    with pytest.raises(SLQInputError, match="too large"):
        decode_image(pending)


BOMB_SCRIPT = textwrap.dedent("""
    import sys, zlib, struct, warnings
    warnings.simplefilter("ignore")
    from PIL import Image
    from slq_hf.processing import SLQInputError, load_image, to_items, ImageBudget

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    width = height = 8200  # RGB: 269 MB decoded, under PIL's own limit, above slq_hf's 256 MiB
    packer = zlib.compressobj(9)
    row = b"\\0" + bytes(range(1, 256)) * (3 * width // 255) + b"\\1" * (3 * width % 255)  # non-zero pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    del data
    def reset():
        # Linux: writing 5 resets the peak RSS, so each phase is measured on its own.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return current()
    def current():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
    def peak():
        # VmHWM is what getrusage's ru_maxrss reports, but resettable (ru_maxrss never goes down).
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
    base = reset()
    for call in (lambda: load_image(path), lambda: to_items([path], ImageBudget(max_pixels=65536)),
                 lambda: load_image(path, budget=ImageBudget(max_pixels=65536))):
        try:
            call()
            print("ACCEPTED")
        except SLQInputError:
            pass
    ours = peak() - base
    base = reset()
    with Image.open(path) as raw:
        raw.load()
    plain = peak() - base
    print(f"{ours} {plain}")
""")


def test_crafted_bomb_peak_memory_stays_bounded(tmp_path):
    """A sub-megabyte PNG that decodes to 269 MB: slq_hf refuses it from the header, so peak RSS barely moves; plain
    PIL decoding it (the control) raises peak RSS by the decoded size."""
    path = tmp_path / "bomb.png"
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ACCEPTED" not in result.stdout
    ours, plain = map(int, result.stdout.split()[-2:])
    assert path.stat().st_size < 1_000_000
    assert ours < 32, ours  # MiB above the baseline
    assert plain > 200, plain  # the control: the file really is a bomb


def test_in_memory_images_count_only_their_rgb_result(monkeypatch, tmp_path):
    """A caller's decoded PIL image costs nothing more to decode: only what it is converted to counts; the same
    picture opened lazily from a file counts its decode too."""
    image = Image.new("L", (400, 300))
    budget = ImageBudget(max_long_side=40)  # shrunk to 40x30 before the RGB conversion
    monkeypatch.setattr(image_files, "MAX_DECODED_BYTES", 40 * 30 * 4)
    assert load_image(image, budget=budget).size == (40, 30)
    with pytest.raises(SLQInputError, match="too large"):
        load_image(image)  # no budget: the 400x300 RGB result is too large
    image.save(tmp_path / "grey.png")
    with pytest.raises(SLQInputError, match="too large"):
        load_image(Image.open(tmp_path / "grey.png"), budget=budget)  # decoding 400x300 L is 120,000 bytes


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs FIFOs, /dev/zero")
def test_pipes_and_devices_are_refused_unopened_and_named_as_such(model, tmp_path):
    """A FIFO named like a photo (opening it would block forever) and /dev/zero (endless bytes) are never opened;
    the error says what they are, not "is a folder" or "not found"."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for value in (str(fifo), fifo, {"image": str(fifo)}, "/dev/zero", Path("/dev/zero"), str(tmp_path / "zero.png")):
        with pytest.raises(SLQInputError, match=r"is not a regular file \(a pipe") as info:
            model.encode(["ok", value])
        assert "input 1" in str(info.value)
        with pytest.raises(SLQInputError, match="is not a regular file"):
            load_image(value["image"] if isinstance(value, dict) else value)
