"""`slq-hf karr-build` plumbing: pairs in, the backbone's own greedy rewrites, leak filtering, KARR layout out.

A tiny random backbone writes nonsense, so quality is not tested here; what is: the prompt carries the caption and
object word, rewrites come from ``backbone.generate`` (greedy, same tokens as calling it directly), leaking and
empty rewrites are skipped and counted, image links survive relative to the output file, and ``slq-hf eval`` reads
the result.
"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from transformers import AutoTokenizer, GenerationConfig

from slq_hf import SLQModel
from slq_hf.cli import main
from slq_hf.data import karr_build
from slq_hf.data.karr_build import (
    DEFAULT_TEMPLATE,
    build_karr,
    clean_rewrite,
    leaked_words,
    object_words,
    read_pairs,
    rewrite_captions,
)
from slq_hf.evaluation import read_karr


def _pairs_file(tmp_path, lines: list[dict]) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    for n, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "img" / f"{n}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


LINES = [
    {"image": "img/0.png", "text": "a grey cat on a bookshelf", "id": "cat"},
    {"image": "img/1.png", "caption": "a carrot stick", "object": "carrot"},
    {"image": "img/2.png", "text": "two dogs in the park"},
    {"image": "img/0.png", "text": "a cat sleeping"},  # same image: adds a caption, still one KARR line
    {"image": "img/3.png", "text": "a red triangle in the top left", "split": "train"},
]


def test_object_words_leaks_and_cleaning():
    assert object_words("a grey cat on a bookshelf") == ["cat"]
    assert object_words("a red triangle in the top left") == ["triangle"]
    assert object_words("two dogs in the park") == ["dogs"]
    assert leaked_words("The CAT sits", ["cat"]) == ["cat"]
    assert leaked_words("three cats", ["cat"]) == ["cat"] and leaked_words("two boxes", ["box"]) == ["box"]
    assert leaked_words("a catalogue of animals", ["cat"]) == []  # whole words only
    assert clean_rewrite("\n  Rewrite: \"the animal with nine lives\"\nCaption: x") == "the animal with nine lives"
    assert clean_rewrite(" \n ") == ""


def test_build_karr_skips_and_counts_leaks_and_writes_the_karr_layout(tmp_path):
    pairs = read_pairs(_pairs_file(tmp_path, LINES))
    assert [len(p.captions) for p in pairs] == [2, 1, 1, 1]
    seen: dict[str, list] = {}
    canned = ["the animal with (2+7) lives sitting on a bookshelf", "Rewrite: a long orange root vegetable",
              "two Dogs playing", "   "]

    def rewrite(prompts, images):
        seen["prompts"], seen["images"] = prompts, images
        return canned

    out = tmp_path / "out" / "karr.jsonl"
    stats = build_karr(pairs, out, rewrite)
    assert "Caption: a grey cat on a bookshelf\nRewrite:" in seen["prompts"][0]
    assert 'Never use the word "carrot"' in seen["prompts"][1]  # the explicit object wins over the heuristic
    assert seen["prompts"][0] == DEFAULT_TEMPLATE.format(caption="a grey cat on a bookshelf", object="cat")
    assert (stats.written, stats.skipped_leak, stats.skipped_empty, stats.total) == (2, 1, 1, 4)
    assert [s["reason"] for s in stats.skipped] == ["leaks ['dogs']", "empty"]

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"image": "../img/0.png", "knowledge": canned[0], "caption": "a grey cat on a bookshelf",
                        "split": "test", "id": "cat"}
    assert lines[1]["knowledge"] == "a long orange root vegetable" and lines[1]["id"] == "1"
    dataset = read_karr(out, split="test")  # the reader `slq-hf eval --format karr` uses
    assert dataset.texts == [canned[0], "a long orange root vegetable"]
    assert dataset.images[0].resolve() == (tmp_path / "img" / "0.png").resolve()
    assert read_karr(out, split="test", text_field="caption").texts == ["a grey cat on a bookshelf",
                                                                        "a carrot stick"]


@pytest.fixture
def slq_folder(tiny_backbone_path, tmp_path):
    """An SLQ folder on a copy of the tiny Qwen3-VL whose generation config suppresses whitespace-only tokens: the
    random backbone otherwise greedily emits newlines only, and every rewrite would be empty."""
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_path("qwen3_vl"), backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    blank = [i for t, i in tokenizer.get_vocab().items() if not tokenizer.convert_tokens_to_string([t]).strip()]
    GenerationConfig(suppress_tokens=blank, pad_token_id=tokenizer.pad_token_id).save_pretrained(backbone)
    model = SLQModel.from_backbone(str(backbone), num_queries=4)
    model.save_pretrained(tmp_path / "slq")
    return str(tmp_path / "slq"), model


def test_cli_rewrites_with_the_backbones_greedy_generate(slq_folder, tmp_path, capsys):
    folder, model = slq_folder
    data = _pairs_file(tmp_path, LINES)
    out, skipped = tmp_path / "karr.jsonl", tmp_path / "skipped.jsonl"
    argv = ["karr-build", "--data", data, "--model", folder, "--out", str(out), "--with-image", "--max-new-tokens",
            "5", "--batch-size", "1", "--skipped", str(skipped)]
    code = main(argv)
    summary = capsys.readouterr().out
    assert "karr-build: 4 images" in summary
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert len(kept) + len(dropped) == 4 and code == 0 and kept

    # Every rewrite is exactly the backbone's own greedy continuation of the documented prompt.
    pairs = read_pairs(data)
    prompts = [DEFAULT_TEMPLATE.format(caption=p.captions[0], object=", ".join(p.objects or object_words(
        p.captions[0]))) for p in pairs]
    direct = rewrite_captions(model.backbone, model.processor, prompts, [p.image for p in pairs], max_new_tokens=5,
                              batch_size=1)
    results = {line["caption"]: line["knowledge"] for line in kept}
    results.update({line["caption"]: line["rewrite"] for line in dropped})
    assert [results[p.captions[0]] for p in pairs] == [clean_rewrite(text) for text in direct]

    # Greedy: a second run writes the same file, and `slq-hf eval` reads it.
    first = out.read_text()
    assert main(argv) == 0 and out.read_text() == first
    assert main(["eval", "--model", folder, "--data", str(out), "--format", "karr", "--split", "all",
                 "--no-progress"]) == 0


def test_cli_output_evaluates_with_slq_hf_eval(slq_folder, tmp_path, monkeypatch, capsys):
    folder, _ = slq_folder
    data = _pairs_file(tmp_path, LINES)
    monkeypatch.setattr(karr_build, "rewrite_captions",
                        lambda backbone, processor, prompts, images, **kw: [f"knowledge caption {n}"
                                                                            for n in range(len(prompts))])
    out = tmp_path / "karr.jsonl"
    assert main(["karr-build", "--data", data, "--model", folder, "--out", str(out)]) == 0
    assert main(["eval", "--model", folder, "--data", str(out), "--format", "karr", "--split", "all",
                 "--no-progress", "--output", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results  # a full retrieval report over the 4 built lines


def test_cli_errors_name_the_problem(slq_folder, tmp_path, capsys):
    folder, _ = slq_folder
    data = _pairs_file(tmp_path, [{"image": "img/missing.png", "text": "a cat"}])
    assert main(["karr-build", "--data", data, "--model", folder, "--out", str(tmp_path / "k.jsonl")]) == 2
    assert "pairs.jsonl:1: image file 'img/missing.png' not found" in capsys.readouterr().err
    template = tmp_path / "template.txt"
    template.write_text("no placeholder here")
    data = _pairs_file(tmp_path, LINES)
    assert main(["karr-build", "--data", data, "--model", folder, "--out", str(tmp_path / "k.jsonl"), "--template",
                 str(template)]) == 2
    assert "no {caption} placeholder" in capsys.readouterr().err


def test_one_file_for_two_roles_is_refused_and_skipped_is_written_like_out(tmp_path, monkeypatch, capsys):
    data = _pairs_file(tmp_path, LINES)
    monkeypatch.setattr(karr_build, "load_generator", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(karr_build, "rewrite_captions", lambda backbone, processor, prompts, images, **kw: [
        "a pet animal", "an orange root", "two dogs", "a shape"][:len(prompts)])
    out = tmp_path / "karr.jsonl"
    out.write_text("previous result\n")
    assert main(["karr-build", "--data", data, "--model", "m", "--out", str(out), "--skipped", str(out)]) == 2
    assert "--skipped" in capsys.readouterr().err and out.read_text() == "previous result\n"
    assert main(["karr-build", "--data", data, "--model", "m", "--out", data]) == 2
    assert json.loads(open(data).readline()) == LINES[0]  # the input is left alone
    skipped = tmp_path / "new" / "folder" / "skipped.jsonl"  # created like --out's folder, after all the work
    assert main(["karr-build", "--data", data, "--model", "m", "--out", str(out), "--skipped", str(skipped)]) == 0
    assert [json.loads(line)["rewrite"] for line in skipped.read_text().splitlines()] == ["two dogs"]
    assert len(out.read_text().splitlines()) == 3


def test_captions_with_unicode_line_separators_survive_the_round_trip(tmp_path):
    data = _pairs_file(tmp_path, [{"image": "img/0.png", "text": "a cat\u2028on a mat"}])
    out = tmp_path / "karr.jsonl"
    build_karr(read_pairs(data), out, lambda prompts, images: ["a pet"])
    assert read_karr(out, split="test").texts == ["a pet"]
    assert read_karr(out, split="test", text_field="caption").texts == ["a cat\u2028on a mat"]


def test_with_image_opens_images_with_the_image_checks(tiny_backbone_path, tmp_path, fake_ghostscript):
    """--with-image reads images as every image input is read: an EPS named .png is refused without Ghostscript
    (plain Image.open ran it), and the error names the file; a transparent PNG is shown on white, as encode sees it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    eps = tmp_path / "photo.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n%%EOF\n")
    backbone = AutoModelForImageTextToText.from_pretrained(tiny_backbone_path("qwen3_vl"))
    processor = AutoProcessor.from_pretrained(tiny_backbone_path("qwen3_vl"))
    with pytest.raises(ValueError, match=r"Cannot read image \(file '.*photo.png'\).*not an image slq_hf decodes"):
        rewrite_captions(backbone, processor, ["x"], [eps], max_new_tokens=1)
    assert not fake_ghostscript.exists()

    clear, white = tmp_path / "clear.png", tmp_path / "white.png"
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(clear)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white)
    seen = []  # the pixels generate() shows the backbone, as its vision tower receives them
    backbone.model.visual.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    rewrite_captions(backbone, processor, ["x", "x"], [clear, white], max_new_tokens=1, batch_size=1)
    assert len(seen) == 2 and seen[0].equal(seen[1])  # convert("RGB") alone made the transparent pixels black


def test_a_run_that_keeps_nothing_leaves_the_previous_set(tmp_path):
    pairs = read_pairs(_pairs_file(tmp_path, LINES[:1]))
    out = tmp_path / "karr.jsonl"
    assert build_karr(pairs, out, lambda prompts, images: ["the animal with nine lives"]).written == 1
    before = out.read_text()
    stats = build_karr(pairs, out, lambda prompts, images: ["a grey cat"])  # leaks "cat": nothing kept
    assert stats.written == 0 and stats.skipped_leak == 1
    assert out.read_text() == before and read_karr(out, split="test").texts == ["the animal with nine lives"]
