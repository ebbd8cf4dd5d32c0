"""Evaluation: metrics against hand-computed cases, readers on tiny fixture files, cache, CLI end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from slq_hf.evaluation import (
    ComposedQuery,
    DataFormatError,
    RetrievalDataset,
    composed_retrieval_metrics,
    encode_inputs,
    evaluate_embeddings,
    evaluate_retrieval,
    format_comparison_table,
    format_results_table,
    image_text_retrieval_metrics,
    load_retrieval_dataset,
    modality_gap,
    model_fingerprint,
    plot_modality_gap,
    read_hf,
    read_jsonl,
    read_karpathy,
    read_karr,
    save_results_json,
)

from helpers import run_readme_example

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


# ------------------------------------------------------------------------------------------------------- metrics
# 3 images x 5 captions; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
SIM = torch.tensor([
    # t0    t1    t2    t3    t4
    [0.90, 0.10, 0.80, 0.20, 0.30],  # image 0
    [0.70, 0.60, 0.50, 0.40, 0.95],  # image 1
    [0.10, 0.20, 0.30, 0.90, 0.00],  # image 2
])
OWNER = [0, 0, 1, 2, 2]


def test_image_to_text_any_caption_counts():
    # image 0: best own caption t0 (0.90) beats every other caption -> rank 1.
    # image 1: own caption t2 (0.50) is beaten by t0 0.70, t1 0.60, t4 0.95 -> rank 4.
    # image 2: best own caption t3 (0.90) beats the rest -> rank 1.   ranks (1-based) = [1, 4, 1]
    m = image_text_retrieval_metrics(SIM, OWNER, ks=(1, 3, 4))["i2t"]
    assert m["R@1"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(2 / 3)
    assert m["R@4"] == pytest.approx(1.0)
    assert m["mean_rank"] == pytest.approx(2.0)
    assert m["median_rank"] == 1
    assert m["num_queries"] == 3


def test_text_to_image_over_all_captions():
    # t0: img0 .90 is top -> 1.  t1: img0 .10 < img1 .60, img2 .20 -> 3.  t2: img1 .50 < img0 .80 -> 2.
    # t3: img2 .90 top -> 1.  t4: img2 .00 < img0 .30, img1 .95 -> 3.   ranks = [1, 3, 2, 1, 3]
    m = image_text_retrieval_metrics(SIM, OWNER, ks=(1, 2, 3))["t2i"]
    assert m["R@1"] == pytest.approx(2 / 5)
    assert m["R@2"] == pytest.approx(3 / 5)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["mean_rank"] == pytest.approx(10 / 5)
    assert m["median_rank"] == 2
    assert m["num_queries"] == 5


def test_ties_count_against_the_query():
    # A collapsed model (all scores equal) must not get perfect recall: the tied competitor ranks first.
    m = image_text_retrieval_metrics(torch.full((2, 2), 0.5), [0, 1], ks=(1, 2))
    assert m["t2i"]["R@1"] == 0.0 and m["t2i"]["R@2"] == 1.0
    assert m["i2t"]["R@1"] == 0.0 and m["i2t"]["mean_rank"] == 2.0


def _brute_force_recall(sim: list[list[float]], correct, num_texts: int, ks) -> dict[str, dict[str, float]]:
    """Both directions by counting, query by query: ``correct(i, t)`` says whether text t answers image i; a query's
    rank is the number of wrong candidates scoring at least its best right one (ties count against it)."""
    ranks: dict[str, list[int]] = {"i2t": [], "t2i": []}
    images = range(len(sim))
    for i in images:
        right = [sim[i][t] for t in range(num_texts) if correct(i, t)]
        if right:  # an image without captions is no image->text query
            ranks["i2t"].append(sum(sim[i][t] >= max(right) for t in range(num_texts) if not correct(i, t)))
    for t in range(num_texts):
        best = max(sim[i][t] for i in images if correct(i, t))
        ranks["t2i"].append(sum(sim[i][t] >= best for i in images if not correct(i, t)))
    return {d: {**{f"R@{k}": sum(r < k for r in rs) / len(rs) for k in ks},
                "mean_rank": sum(r + 1 for r in rs) / len(rs)} for d, rs in ranks.items()}


def test_recall_equals_a_brute_force_count_with_ties_several_captions_and_k_beyond_the_gallery():
    import random

    rng = random.Random(0)
    ks = (1, 2, 5, 50)  # 50: more than every gallery here (recall 1)
    for _ in range(200):
        num_images, num_texts = rng.randint(1, 6), rng.randint(1, 12)
        owner = [rng.randrange(num_images) for _ in range(num_texts)]
        texts = [rng.choice(["a", "b", "c", "d"]) for _ in range(num_texts)]  # exact duplicates across images
        sim = [[rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(num_texts)] for _ in range(num_images)]
        got = image_text_retrieval_metrics(torch.tensor(sim, dtype=torch.float64), owner, ks, texts=texts)
        strict = _brute_force_recall(sim, lambda i, t: owner[t] == i, num_texts, ks)
        dedup = _brute_force_recall(sim, lambda i, t: any(owner[u] == i and texts[u] == texts[t]
                                                          for u in range(num_texts)), num_texts, ks)
        for direction in ("i2t", "t2i"):
            for name, expected in ((direction, strict[direction]), (f"{direction}_dedup", dedup[direction])):
                for key, value in expected.items():
                    assert got[name][key] == pytest.approx(value, abs=1e-12), (name, key, sim, owner, texts)


def test_duplicate_captions_count_as_hits():
    texts = ["a red square", "A red  square.", "a blue circle"]  # t0 and t1 are the same caption
    sim = torch.tensor([
        # t0   t1   t2
        [0.2, 0.9, 0.1],  # image 0 owns t0
        [0.8, 0.3, 0.0],  # image 1 owns t1
        [0.1, 0.2, 0.7],  # image 2 owns t2
    ])
    m = image_text_retrieval_metrics(sim, [0, 1, 2], ks=(1,), texts=texts)
    # Strict: t0 -> img1 (.8) beats img0 (.2); t1 -> img0 (.9) beats img1 (.3); t2 right. 1 of 3.
    assert m["t2i"]["R@1"] == pytest.approx(1 / 3)
    # Strict i2t: img0's t0 (.2) loses to t1 (.9); img1's t1 (.3) loses to t0 (.8); img2 right. 1 of 3.
    assert m["i2t"]["R@1"] == pytest.approx(1 / 3)
    # With duplicates as hits, images 0 and 1 both answer "a red square" and both captions answer both images.
    assert m["t2i_dedup"]["R@1"] == 1.0
    assert m["i2t_dedup"]["R@1"] == 1.0


def test_composed_retrieval_excludes_reference():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    queries = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # q0 unnormalised on purpose: cosine is used
    # q0 (ref 0, target 2): cosines 1, 0, .6, -1; image 0 excluded -> target first -> rank 1.
    # q1 (ref 2, target 3): cosines 0, 1, .8, 0; image 2 excluded; target 0 ties image 0 and loses to
    # image 1 -> rank 3.
    m = composed_retrieval_metrics(queries, images, target_index=[2, 3], reference_index=[0, 2], ks=(1, 2, 3))
    assert (m["R@1"], m["R@2"], m["R@3"]) == (0.5, 0.5, 1.0)
    assert m["mean_rank"] == 2.0
    # Without the exclusion the reference itself wins q0 (rank 2) and q1 gets rank 4.
    m = composed_retrieval_metrics(queries, images, target_index=[2, 3], ks=(1, 4))
    assert m["R@1"] == 0.0 and m["R@4"] == 1.0 and m["mean_rank"] == 3.0
    with pytest.raises(ValueError, match="reference image as their target"):
        composed_retrieval_metrics(queries, images, target_index=[2, 3], reference_index=[2, 0])


def test_modality_gap_hand_case():
    # Images all at (1, 0), texts all at (0, 1) after normalisation: centroid distance sqrt(2).
    assert modality_gap(torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])) == \
        pytest.approx(math.sqrt(2))
    assert modality_gap(torch.eye(3), torch.eye(3)) == pytest.approx(0.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="outside"):
        image_text_retrieval_metrics(SIM, [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="5 text columns but text_to_image has 4"):
        image_text_retrieval_metrics(SIM, [0, 0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_embeddings(RetrievalDataset.from_pairs(["a", "b"], ["x", "y"]), torch.tensor([[1.0], [math.nan]]),
                            torch.ones(2, 1))
    for not_a_dataset in ([("a.png", "x")], {"images": []}, "data.jsonl"):
        with pytest.raises(TypeError, match="expected a RetrievalDataset from load_retrieval_dataset"):
            evaluate_retrieval(None, not_a_dataset)


def test_reports(tmp_path):
    data = RetrievalDataset.from_pairs(["a.png", "b.png", "c.png"], [["t0", "t1"], "t2", ["t3", "t4"]], name="toy")
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [-1.0, 0.2], [-1.0, -0.2]])
    result = evaluate_embeddings(data, images, texts)
    assert result["metrics"]["t2i"]["R@1"] == 1.0 and result["metrics"]["i2t"]["R@1"] == 1.0
    table = format_results_table(result)
    assert "| text → image | 100.0 | 100.0 | 100.0 |" in table and "toy: 3 images, 5 texts" in table
    comparison = format_comparison_table({"perfect": result, "none": {"metrics": {}}}, columns=("t2i/R@1",))
    assert "| perfect | 100.0 |" in comparison and "| none | – |" in comparison
    saved = json.loads(save_results_json(result, tmp_path / "r.json").read_text())
    assert saved["metrics"]["t2i"]["R@1"] == 1.0
    png = plot_modality_gap(images, texts, tmp_path / "gap.png", title="toy")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100


# ------------------------------------------------------------------------------------------------------- readers
def _png(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), COLOURS[colour]).save(path)
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_karpathy_reader(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(tmp_path / "imgs" / "val2014" / name)
    doc = {"images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "test", "imgid": 0,
         "sentences": [{"raw": "cap a0"}, {"raw": "cap a1"}, {"raw": "cap a2"}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "restval", "imgid": 1, "sentences": [{"raw": "cap b"}]},
        {"filename": "c.jpg", "filepath": "val2014", "split": "test", "imgid": 2, "sentences": [{"raw": "cap c"}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc, indent=1))
    data = read_karpathy(path, "test", image_root=tmp_path / "imgs")
    assert data.images == [tmp_path / "imgs/val2014/a.jpg", tmp_path / "imgs/val2014/c.jpg"]
    assert data.texts == ["cap a0", "cap a1", "cap a2", "cap c"]
    assert data.text_to_image == [0, 0, 0, 1]
    assert read_karpathy(path, "test", image_root=tmp_path / "imgs", max_captions=2).texts == ["cap a0", "cap a1",
                                                                                                 "cap c"]
    assert read_karpathy(path, "train", image_root=tmp_path / "imgs").texts == ["cap b"]  # restval joins train
    assert load_retrieval_dataset(path, image_root=tmp_path / "imgs").texts == data.texts  # format from suffix
    with pytest.raises(DataFormatError, match=r"image file not found .*--image-root"):
        read_karpathy(path, "test")  # images are not next to the JSON
    with pytest.raises(DataFormatError, match=r"no image has split 'val'.*\['restval', 'test'\]"):
        read_karpathy(path, "val", image_root=tmp_path / "imgs")


def test_karpathy_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n   "sentences": [{"raw": "x"}]\n  oops\n]}')
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:4: invalid JSON")):
        read_karpathy(path)
    doc = {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "ok"}]},
                      {"filename": "b.jpg", "split": "test", "sentences": [{"tokens": ["no", "raw"]}]}]}
    path.write_text(json.dumps(doc, indent=2))
    line = path.read_text().splitlines().index('      "filename": "b.jpg",') + 1
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:{line}: images[1] ('b.jpg'): every sentence")):
        read_karpathy(path, check_files=False)
    with pytest.raises(DataFormatError, match="data file not found"):
        read_karpathy(tmp_path / "missing.json")


def test_jsonl_reader_pairs_and_composed(tmp_path):
    for colour in ("red", "green", "blue"):
        _png(tmp_path / "img" / f"{colour}.png", colour)
    path = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "img/red.png", "text": "a red square", "split": "test"},
        {"image": "img/green.png", "texts": ["a green square", "green"], "split": "test"},
        "",
        {"image": "img/red.png", "caption": "red again", "split": "test"},
        {"image": "img/blue.png", "text": "train only", "split": "train"},
        {"reference": "img/red.png", "text": "make it blue", "target": "img/blue.png", "split": "test"},
    ])
    data = read_jsonl(path, "test")
    assert data.images == [tmp_path / "img/red.png", tmp_path / "img/green.png", tmp_path / "img/blue.png"]
    assert data.texts == ["a red square", "a green square", "green", "red again"]
    assert data.text_to_image == [0, 1, 1, 0]
    assert [(q.reference, q.text, q.target) for q in data.composed] == [(0, "make it blue", 2)]
    assert read_jsonl(path, "train").texts == ["train only"]
    assert load_retrieval_dataset(path, split="all").num_images == 3


@pytest.mark.parametrize("line, message", [
    ('{"image": "img/red.png", "text": "ok"', "invalid JSON at column"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"image": "img/nope.png", "text": "x"}', "image file 'img/nope.png' not found"),
    ('{"image": "img/red.png"}', "needs exactly one of"),
    ('{"image": "img/red.png", "text": ""}', "non-empty caption"),
    ('{"reference": "img/red.png", "target": "img/red.png"}', "missing ['text']"),
    ('{"txt": "x"}', "got keys ['txt']"),
])
def test_jsonl_malformed_names_file_and_line(tmp_path, line, message):
    _png(tmp_path / "img" / "red.png")
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"image": "img/red.png", "text": "fine"}', "", line])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_jsonl(path, split=None)


def test_jsonl_split_errors(tmp_path):
    _png(tmp_path / "r.png")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "r.png", "text": "x", "split": "train"},
                                                {"image": "r.png", "text": "y"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: ") + "this line has no \"split\""):
        read_jsonl(path, "test")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "r.png", "text": "x", "split": "train"}])
    with pytest.raises(DataFormatError, match=r"no line has split 'test'; splits in the file: \['train'\]"):
        read_jsonl(path, "test")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="holds no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_karr_reader(tmp_path):
    _png(tmp_path / "s" / "0.png", "red")
    _png(tmp_path / "s" / "1.png", "blue")
    path = _write_jsonl(tmp_path / "karr.jsonl", [
        {"image": "s/0.png", "knowledge": "the colour of blood", "caption": "a red square", "id": "s0"},
        {"image": "s/1.png", "knowledge": "the colour of a clear sky", "caption": "a blue square", "id": "s1"},
    ])
    data = load_retrieval_dataset(path)  # "knowledge" in the first record -> karr
    assert data.texts == ["the colour of blood", "the colour of a clear sky"]
    assert data.text_to_image == [0, 1] and data.image_ids == ["s0", "s1"]
    assert read_karr(path, text_field="caption").texts == ["a red square", "a blue square"]
    _write_jsonl(path, [{"image": "s/0.png", "knowledge": "a"}, {"image": "s/1.png"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: ") + "a KARR line needs"):
        read_karr(path)
    _write_jsonl(path, [{"image": "s/0.png", "knowledge": "a"}, {"image": "s/0.png", "knowledge": "b"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: ") + ".*already appeared on line 1"):
        read_karr(path)


def test_hf_reader(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, blue = (Image.new("RGB", (64, 64), COLOURS[c]) for c in ("red", "blue"))
    table = datasets.Dataset.from_dict({"image": [red, blue, red], "caption": [["r0", "r1"], ["b"], ["r2"]]})
    table = table.cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "ds"))
    data = load_retrieval_dataset(tmp_path / "ds", split="test")  # a folder -> hf
    assert data.num_images == 2  # identical red images merged
    assert data.texts == ["r0", "r1", "b", "r2"] and data.text_to_image == [0, 0, 1, 0]
    loaded = data.images[1].load()
    assert loaded.getpixel((5, 5)) == COLOURS["blue"]
    with pytest.raises(ValueError, match=r"no split 'val'; splits are \['test'\]"):
        read_hf(tmp_path / "ds", split="val")
    with pytest.raises(ValueError, match="cannot tell which column holds the text"):
        read_hf(table.rename_column("caption", "label"), split=None)
    assert (data.name, data.split) == ("ds:test", "test")
    # A single Dataset has no splits: evaluated with the default split="test" it claimed one ("one:test").
    table.save_to_disk(str(tmp_path / "one"))
    for source in (tmp_path / "one", table):
        single = load_retrieval_dataset(source)
        assert single.split is None and not single.name.endswith(":test"), source


# --------------------------------------------------------------------------------------------- encoding + cache
class ColourEncoder:
    """Perfect toy encoder: an image -> its mean RGB, a text -> the RGB of the colour word in it. Counts items."""

    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += len(inputs)
        rows = []
        for item in inputs:
            if isinstance(item, str):
                rows.append(next(torch.tensor(rgb, dtype=torch.float) for name, rgb in COLOURS.items()
                                 if name in item))
            else:
                image = item["image"] if isinstance(item, dict) else item
                rows.append(torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float))
        return torch.stack(rows)


def _colour_set(tmp_path: Path) -> RetrievalDataset:
    paths = [_png(tmp_path / f"{c}.png", c) for c in COLOURS]
    return RetrievalDataset.from_pairs(paths, [[f"a {c} square", f"{c}!"] for c in COLOURS], name="colours")


def test_evaluate_retrieval_with_a_callable_and_cache_reuse(tmp_path):
    data = _colour_set(tmp_path)
    encoder = ColourEncoder()
    first = evaluate_retrieval(encoder, data, batch_size=2, cache_dir=tmp_path / "cache", model_id="colour-v1",
                               gap_plot=tmp_path / "gap.png")
    assert first["metrics"]["t2i"]["R@1"] == 1.0 and first["metrics"]["i2t"]["R@1"] == 1.0
    assert encoder.calls == 4 + 8 and {p["cache"] for p in first["encode"].values()} == {"miss"}
    assert Path(first["gap_plot"]).is_file()
    second = evaluate_retrieval(encoder, data, batch_size=2, cache_dir=tmp_path / "cache", model_id="colour-v1")
    assert encoder.calls == 12, "a cache hit must not call the model"
    assert {p["cache"] for p in second["encode"].values()} == {"hit"}
    assert second["metrics"] == first["metrics"]
    # Another model id, or changed captions, miss the cache; the images part of the latter still hits.
    evaluate_retrieval(encoder, data, cache_dir=tmp_path / "cache", model_id="colour-v2")
    assert encoder.calls == 24
    data.texts[0] = "red red red"
    third = evaluate_retrieval(encoder, data, cache_dir=tmp_path / "cache", model_id="colour-v1")
    assert third["encode"]["image"]["cache"] == "hit" and third["encode"]["text"]["cache"] == "miss"
    # Rewriting an image file (new size/mtime) invalidates the image part.
    Image.new("RGB", (65, 64), COLOURS["red"]).save(data.images[0])
    fourth = evaluate_retrieval(encoder, data, cache_dir=tmp_path / "cache", model_id="colour-v1")
    assert fourth["encode"]["image"]["cache"] == "miss"


def test_image_paths_given_as_str_are_embedded_as_images(tmp_path):
    """from_pairs(["a.png", ...]) (README: "PIL images or paths"): the encoders read every str as a text, so str
    image paths were embedded as the texts of their file names."""
    paths = [str(_png(tmp_path / f"img{n}.png", colour)) for n, colour in enumerate(COLOURS)]
    seen: list = []

    def encoder(inputs):
        seen.extend(inputs)
        return ColourEncoder()(inputs)

    data = RetrievalDataset.from_pairs(paths, [f"a {c} square" for c in COLOURS])
    result = evaluate_retrieval(encoder, data, cache_dir=tmp_path / "cache", model_id="colour")
    assert not any(isinstance(item, str) and item in paths for item in seen)
    assert result["metrics"]["t2i"]["R@1"] == 1.0 and result["metrics"]["i2t"]["R@1"] == 1.0


def test_cache_needs_an_identity_for_plain_callables(tmp_path):
    with pytest.raises(ValueError, match="pass model_id="):
        encode_inputs(ColourEncoder(), ["red"], cache_dir=tmp_path)


def test_corrupt_cache_is_recomputed(tmp_path):
    encoder = ColourEncoder()
    encode_inputs(encoder, ["red", "blue"], cache_dir=tmp_path, model_id="m")
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable embedding cache"):
        out = encode_inputs(encoder, ["red", "blue"], cache_dir=tmp_path, model_id="m")
    assert encoder.calls == 4 and out.shape == (2, 3)


def test_encoder_shape_is_checked():
    with pytest.raises(ValueError, match=r"returned shape \(1, 3\) for 2 inputs"):
        encode_inputs(lambda inputs: torch.zeros(1, 3), ["a", "b"])


def test_composed_through_evaluate_retrieval(tmp_path):
    for c in ("red", "blue", "green"):
        _png(tmp_path / f"{c}.png", c)
    path = _write_jsonl(tmp_path / "cir.jsonl", [
        {"reference": "red.png", "text": "now blue", "target": "blue.png"},
        {"reference": "blue.png", "text": "now green", "target": "green.png"},
    ])
    data = read_jsonl(path)

    def encoder(inputs):  # composed query = the colour named in the text; the reference is ignored
        return ColourEncoder()([item["text"] if isinstance(item, dict) else item for item in inputs])

    result = evaluate_retrieval(encoder, data)
    assert result["metrics"]["composed"]["R@1"] == 1.0 and "t2i" not in result["metrics"]
    assert result["modality_gap"] is None


# ---------------------------------------------------------------------------------------------- SLQ end to end
@pytest.fixture(scope="module")
def slq_dir(tiny_backbone_path, tmp_path_factory):
    from slq_hf import SLQModel

    out = tmp_path_factory.mktemp("slq_eval") / "slq"
    SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=4).save_pretrained(out)
    return out


def test_slq_model_fingerprint_tracks_queries(slq_dir):
    from slq_hf import SLQModel

    model = SLQModel.from_pretrained(slq_dir)
    before = model_fingerprint(model)
    assert model_fingerprint(SLQModel.from_pretrained(slq_dir)) == before
    with torch.no_grad():
        model.queries[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_slq_streaming_matches_one_shot_encode(slq_dir, tmp_path):
    from slq_hf import SLQModel

    model = SLQModel.from_pretrained(slq_dir)
    data = _colour_set(tmp_path)
    # chunk_size=3 sends several chunks through the model; the result must not depend on the chunking.
    images = encode_inputs(model, data.images, batch_size=2, chunk_size=3)
    texts = encode_inputs(model, data.texts, batch_size=2, chunk_size=3)
    reference = model.encode([Image.open(p) for p in data.images] + data.texts, batch_size=8)
    torch.testing.assert_close(torch.cat([images, texts]), reference, atol=1e-5, rtol=1e-4)
    # A caption that looks like a file name is still embedded as text (not refused as a missing image).
    assert encode_inputs(model, ["photo.jpg"]).shape == (1, model.config.embedding_dim)


def test_cli_eval_end_to_end(slq_dir, tmp_path, capsys):
    from slq_hf.cli import main

    for c in COLOURS:
        _png(tmp_path / "img" / f"{c}.png", c)
    data = _write_jsonl(tmp_path / "data.jsonl", [
        *[{"image": f"img/{c}.png", "texts": [f"a {c} square", f"{c}"]} for c in COLOURS],
        {"reference": "img/red.png", "text": "make it blue", "target": "img/blue.png"},
    ])
    argv = ["eval", "--model", str(slq_dir), "--data", str(data), "--output", str(tmp_path / "r.json"),
            "--gap-plot", str(tmp_path / "gap.png"), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "3",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("image → text", "text → image", "duplicate captions = hits", "composed (image + text → image)"):
        assert row in out
    assert "data: 4 images, 8 texts, 1 composed queries" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["metrics"]) == {"i2t", "t2i", "i2t_dedup", "t2i_dedup", "composed"}
    assert result["metrics"]["t2i"]["num_queries"] == 8 and result["metrics"]["i2t"]["num_queries"] == 4
    assert 0.0 <= result["modality_gap"] <= 2.0 and result["model"]["num_queries"] == 4
    with Image.open(tmp_path / "gap.png") as im:
        assert im.format == "PNG"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3  # images, texts, composed
    # Second run: every part from the cache, same numbers.
    assert main(argv) == 0
    again = json.loads((tmp_path / "r.json").read_text())
    assert {p["cache"] for p in again["encode"].values()} == {"hit"}
    assert again["metrics"] == result["metrics"]


def test_cli_eval_errors_name_the_file(slq_dir, tmp_path, capsys):
    from slq_hf.cli import main

    assert main(["eval", "--model", str(slq_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: data file not found" in capsys.readouterr().err
    _png(tmp_path / "r.png")
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"image": "r.png", "text": "ok"}', '{"image": "r.png", "text": '])
    assert main(["eval", "--model", str(slq_dir), "--data", str(bad)]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "no_model"), "--data", str(_write_jsonl(
        tmp_path / "ok.jsonl", ['{"image": "r.png", "text": "ok"}']))]) == 2
    assert "cannot load the SLQ model" in capsys.readouterr().err


def test_cli_eval_help():
    from slq_hf.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    for word in ("karpathy", "jsonl", "karr", "--gap-plot", "--cache-dir", "modality gap", "example:"):
        assert word in text


def test_readme_evaluation_example_runs(tmp_path, monkeypatch):
    run_readme_example("evaluation", tmp_path, monkeypatch)
    assert (tmp_path / "gap.png").is_file() and any((tmp_path / ".slq_cache").glob("*.safetensors"))


def test_sentence_transformer_evaluates_like_slq_model(slq_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    from slq_hf import SLQModel
    from slq_hf.integrations.sentence_transformers import load_sentence_transformer

    for c in ("red", "blue"):
        _png(tmp_path / f"{c}.png", c)
    data = read_jsonl(_write_jsonl(tmp_path / "d.jsonl", [
        {"image": "red.png", "texts": ["a red square", "red"]}, {"image": "blue.png", "text": "a blue square"},
        {"reference": "red.png", "text": "make it blue", "target": "blue.png"},
        # captions that look like files, one of them an existing image: texts in both
        {"image": "red.png", "texts": ["IMG_0042.JPG", str(tmp_path / "blue.png")]},
    ]))
    ours = evaluate_retrieval(SLQModel.from_pretrained(slq_dir), data, return_embeddings=True)
    theirs = evaluate_retrieval(load_sentence_transformer(slq_dir, device="cpu"), data, return_embeddings=True)
    for part in ("image", "text", "composed"):
        torch.testing.assert_close(theirs["embeddings"][part], ours["embeddings"][part], atol=1e-5, rtol=1e-4)
    assert theirs["metrics"] == ours["metrics"]


# ----------------------------------------------------------------------------------------------- options never ignored
def test_rerank_that_cannot_happen_is_an_error_before_encoding(tmp_path):
    """rerank_top_k on data without captions (composed only), or with a model that has no backbone, used to return
    a result without its "rerank" part (or fail only after the encoding)."""
    _png(tmp_path / "red.png", "red")
    _png(tmp_path / "blue.png", "blue")
    composed_only = RetrievalDataset([tmp_path / "red.png", tmp_path / "blue.png"], [], [],
                                     composed=[ComposedQuery(0, "make it blue", 1)], name="cir")
    encoder = ColourEncoder()
    with pytest.raises(ValueError, match="has no captions"):
        evaluate_retrieval(encoder, composed_only, rerank_top_k=5)
    with pytest.raises(ValueError, match="no .backbone/.processor"):
        evaluate_retrieval(encoder, _colour_set(tmp_path), rerank_top_k=5)
    assert encoder.calls == 0  # refused before any encoding


@pytest.mark.parametrize("flags", [["--rerank-scorer", "yes_no"], ["--rerank-rewrite", "{text}"]])
def test_cli_eval_rerank_options_without_reranking_are_refused(tmp_path, capsys, flags):
    """--rerank-scorer / --rerank-rewrite only act with --rerank-top-k; accepted without it they did nothing."""
    from slq_hf.cli import main

    _png(tmp_path / "r.png")
    data = _write_jsonl(tmp_path / "d.jsonl", ['{"image": "r.png", "text": "ok"}'])
    # The model folder does not exist: the options are checked first, so no model is loaded for a refused call.
    assert main(["eval", "--model", str(tmp_path / "no_model"), "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err
    assert "slq-hf eval: error: --rerank-" in err and "cannot load the SLQ model" not in err


def test_rerank_cannot_change_recall_at_top_k_when_the_first_stage_ties():
    """Reranking the top k only re-orders them, so R@k is the first stage's, ties counted against the query. With
    every first-stage score equal (a collapsed model: R@3 = 0), torch.topk picked the tied "top 3" by index, so the
    captions of those images were reranked with their own image and R@3 rose to 3/8."""
    from slq_hf import SLQModel
    from slq_hf.evaluation.reranking import rerank_retrieval_metrics
    from slq_hf.testing.toy_scenes import heldout_scenes

    model = SLQModel.from_backbone(str(Path(__file__).resolve().parents[1] / "examples" / "toy" / "backbone"),
                                   num_queries=4)
    scenes = heldout_scenes()[:8]
    captions = [s.caption for s in scenes]
    captions[1] = captions[0]  # a duplicate caption: the dedup blocks have positives beyond the owner
    data = RetrievalDataset.from_pairs([s.image for s in scenes], captions)
    collapsed = torch.zeros(len(scenes), len(captions))  # (I, T)
    result = rerank_retrieval_metrics(model, data, collapsed, top_k=3, ks=(1, 3), show_progress_bar=False)
    for block in ("t2i", "i2t", "t2i_dedup", "i2t_dedup"):
        assert result["metrics"][block]["R@3"] == 0.0, block


def test_cli_eval_refuses_an_output_that_is_the_data_or_the_other_output(slq_dir, tmp_path, capsys):
    """--output over --data would replace the data file with the results JSON, and one path for --output and
    --gap-plot would replace the figure it reports: both are refused before anything is written."""
    from slq_hf.cli import main

    for c in ("red", "blue"):
        _png(tmp_path / f"{c}.png", c)
    data = _write_jsonl(tmp_path / "data.jsonl",
                        [{"image": f"{c}.png", "text": f"a {c} square"} for c in ("red", "blue")])
    before = data.read_bytes()
    base = ["eval", "--model", str(slq_dir), "--data", str(data), "--no-progress"]
    assert main([*base, "--output", str(data)]) == 2
    assert "--output" in capsys.readouterr().err and data.read_bytes() == before
    same = tmp_path / "out"
    assert main([*base, "--output", str(same), "--gap-plot", str(same)]) == 2
    assert "--gap-plot" in capsys.readouterr().err and not same.exists()


def test_results_table_shows_a_missing_metric_as_a_dash():
    """A block without one of the table's recall columns or ranks (a hand-written or merged result) prints "–", as
    format_comparison_table and the reranked rows do, instead of raising KeyError."""
    result = {"metrics": {"t2i": {"R@1": 0.5, "R@5": 0.75, "mean_rank": 2.0, "median_rank": 1.0, "num_queries": 4},
                          "composed": {"R@1": 0.25, "num_queries": 4}}}
    rows = format_results_table(result).splitlines()
    assert rows[2] == "| text → image | 50.0 | 75.0 | 2.0 | 1 | 4 |"
    assert rows[3] == "| composed (image + text → image) | 25.0 | – | – | – | 4 |"
