"""slq_hf.retrieval: sharded resumable corpus encoding, FAISS search at every precision, Qdrant export, CLI.

A real SLQModel on the committed toy backbone (Qwen3-VL, ~1M parameters) embeds real PNG scenes; FAISS and Qdrant
run for real (local mode). Expected values come from plain numpy (brute-force inner products) or from
slq_hf.evaluation, never from the retrieval code itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from slq_hf import SLQModel  # noqa: E402
from slq_hf.retrieval import (  # noqa: E402
    BadItemError,
    CorpusIndex,
    IndexMismatchError,
    build_index,
    export_qdrant,
    read_corpus,
)
from slq_hf.retrieval import faiss_index as fi  # noqa: E402
from slq_hf.retrieval.manifest import query_set_tensor  # noqa: E402
from slq_hf.retrieval.shards import open_embeddings, shard_paths  # noqa: E402
from slq_hf.testing.toy_scenes import heldout_scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy" / "backbone"


@pytest.fixture(scope="module")
def slq_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slq") / "toy_slq"
    SLQModel.from_backbone(str(TOY), num_queries=8).save_pretrained(out)
    return out


@pytest.fixture()
def model(slq_dir):
    return SLQModel.from_pretrained(slq_dir)


@pytest.fixture(scope="module")
def scenes():
    return heldout_scenes()[:36]


@pytest.fixture()
def image_folder(tmp_path, scenes) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for n, scene in enumerate(scenes):
        where = folder / ("", "sub", "sub/deeper")[n % 3]
        scene.image.save(where / f"scene_{n:03d}.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("not an image")
    scenes[0].image.save(folder / ".hidden" / "skipped.png")
    return folder


def _items_file(tmp_path: Path, scenes, extra_lines: list[str] = ()) -> Path:
    images = tmp_path / "items_images"
    images.mkdir(exist_ok=True)
    lines = []
    for n, scene in enumerate(scenes):
        scene.image.save(images / f"{n}.png")
        if n % 2:
            lines.append({"id": f"img{n}", "image": f"items_images/{n}.png", "colour": scene.colour})
        else:
            lines.append({"id": f"txt{n}", "text": scene.caption, "shape": scene.shape})
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join([json.dumps(line) for line in lines] + list(extra_lines)) + "\n")
    return path


def _all_embeddings(index_dir: Path, num_shards: int) -> np.ndarray:
    return np.concatenate([np.asarray(open_embeddings(shard_paths(index_dir, n)["embeddings"]))
                           for n in range(num_shards)])


# ---------------------------------------------------------------------------------------------------- readers
def test_readers_folder_items_and_detection(image_folder, tmp_path, scenes):
    corpus = read_corpus(image_folder)
    ids = [item.id for item in corpus.items]
    assert corpus.format == "folder" and len(ids) == len(scenes) + 1  # + broken.png; .hidden and notes.txt left out
    assert ids == sorted(ids) and "sub/deeper/scene_002.png" in ids and not any(".hidden" in i for i in ids)
    items = read_corpus(_items_file(tmp_path, scenes[:4], ['{"text": "no id here", "k": 1}']))
    assert [i.id for i in items.items] == ["txt0", "img1", "txt2", "img3", "line-5"]
    assert items.items[1].image == str(tmp_path / "items_images" / "1.png") and items.items[1].metadata == {
        "colour": scenes[1].colour}
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl:2: id 'a' was already used on line 1"):
        read_corpus(duplicate)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no image files"):
        read_corpus(_empty(tmp_path))
    with pytest.raises(ValueError, match="format="):
        read_corpus(image_folder / "notes.txt")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.md").write_text("x")
    return folder


# ------------------------------------------------------------------------------------------- build and search
def test_build_search_bad_items_and_resume_message(model, image_folder, tmp_path, scenes, capsys):
    out = tmp_path / "index"
    manifest = build_index(model, image_folder, out, shard_size=8, batch_size=4)
    assert manifest["num_shards"] == 5 and manifest["num_vectors"] == len(scenes)
    assert manifest["run"] == {**manifest["run"], "skipped_shards": 0, "encoded_shards": 5, "bad_items": 1}
    bad = [json.loads(line) for line in (out / "bad_items.jsonl").read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["image"] == "broken.png" and "broken.png" in bad[0]["reason"]

    index = CorpusIndex.load(out)
    assert index.bad_items == bad and len(index) == len(scenes)
    # Each scene image finds itself first (score = cos with itself = 1).
    queries = [image_folder / "sub" / "scene_001.png", scenes[5].image]
    hits = index.search(model, queries, k=3)
    assert [h[0].id for h in hits] == ["sub/scene_001.png", "sub/deeper/scene_005.png"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1][0].path == str(image_folder.resolve() / "sub" / "deeper" / "scene_005.png")

    # Expected ranking from numpy: query embedding . every shard embedding.
    vectors = _all_embeddings(out, 5)
    query = model.encode([{"text": scenes[7].caption}]).numpy()
    expected = np.argsort(-(vectors @ query[0]), kind="stable")[:5]
    got = index.search(model, scenes[7].caption, k=5)[0]
    assert [h.row for h in got] == expected.tolist()
    np.testing.assert_allclose([h.score for h in got], (vectors @ query[0])[expected], atol=1e-5)

    capsys.readouterr()
    started = time.perf_counter()
    again = build_index(model, image_folder, out, shard_size=8, batch_size=4)
    assert again["run"]["skipped_shards"] == 5 and again["run"]["encoded_shards"] == 0
    assert time.perf_counter() - started < 60  # generous: a re-encode would still pass on a fast machine
    assert "5 of 5 shards already finished, skipped" in capsys.readouterr().err

    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train")
    assert sorted(rows["id"]) == sorted(f"{p.relative_to(image_folder).as_posix()}"
                                        for p in image_folder.rglob("scene_*.png") if ".hidden" not in p.parts)
    table = index.to_dataset()
    np.testing.assert_array_equal(np.asarray(table["embedding"], dtype=np.float32), vectors)


def test_strict_and_every_kind_of_bad_item(model, tmp_path, scenes):
    extra = ['{"id": "gone", "image": "items_images/missing.png"}', '{"id": "blank", "text": "   "}',
             "{not json", '{"id": "nothing", "colour": "red"}', '{"id": "num", "text": 5}', '[1, 2]']
    data = _items_file(tmp_path, scenes[:6], extra)
    out = tmp_path / "index"
    manifest = build_index(model, data, out, shard_size=4)
    bad = {b["id"]: b for b in CorpusIndex.load(out).bad_items}
    assert manifest["bad_items"] == 6 and manifest["num_vectors"] == 6
    assert "not found" in bad["gone"]["reason"] and bad["gone"]["where"] == "items.jsonl:7"
    assert bad["blank"]["reason"] == "empty text"
    assert "invalid JSON" in bad["line-9"]["reason"] and "neither" in bad["nothing"]["reason"]
    assert "must be a string" in bad["num"]["reason"] and "JSON object" in bad["line-12"]["reason"]
    with pytest.raises(BadItemError, match=r"items.jsonl:7: .*not found.*strict"):
        build_index(model, data, tmp_path / "strict", shard_size=4, strict=True)


def test_strict_rerun_stops_at_a_bad_item_an_earlier_run_skipped(model, tmp_path, scenes):
    data = _items_file(tmp_path, scenes[:3], ['{"id": "gone", "image": "items_images/missing.png"}'])
    build_index(model, data, tmp_path / "index", shard_size=2)  # shard 1 finishes, listing "gone" as bad
    with pytest.raises(BadItemError, match=r"items.jsonl:4: .*not found.*earlier run without --strict"):
        build_index(model, data, tmp_path / "index", shard_size=2, strict=True)
    assert build_index(model, data, tmp_path / "index", shard_size=2)["bad_items"] == 1  # the index is intact


# ------------------------------------------------------------------------------------------------------ resume
_KILLED_BUILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from slq_hf import SLQModel
from slq_hf.retrieval import build_index

model = SLQModel.from_pretrained(sys.argv[1])
encode, calls = model.encode, []

def encode_then_hang(*args, **kwargs):
    # batch_size 1 -> chunks of 4 items -> 2 encode calls a shard of 8: call 6 is the second half of shard 2.
    calls.append(1)
    if len(calls) == 6:
        Path(sys.argv[4]).write_text("mid-shard")
        time.sleep(600)
    return encode(*args, **kwargs)

model.encode = encode_then_hang
build_index(model, sys.argv[2], sys.argv[3], shard_size=8, batch_size=1)
"""


def test_resume_after_sigkill_equals_uninterrupted(slq_dir, model, image_folder, tmp_path, capsys):
    killed, marker = tmp_path / "killed", tmp_path / "marker"
    script = tmp_path / "build.py"
    script.write_text(_KILLED_BUILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script), str(slq_dir), str(image_folder), str(killed), str(marker)],
                             env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never reached the third shard"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = sorted(p.name for p in (killed / "shards").glob("*.safetensors"))
    assert finished == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (killed / "index.faiss").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        CorpusIndex.load(killed)
    # A truncated embeddings file of an unfinished shard must not pass for a finished one.
    shard_paths(killed, 3)["embeddings"].write_bytes(b"\x10\x00\x00")

    capsys.readouterr()
    resumed = build_index(model, image_folder, killed, shard_size=8, batch_size=1)
    assert resumed["run"]["skipped_shards"] == 2 and resumed["run"]["encoded_shards"] == 3
    assert "2 of 5 shards already finished, skipped; 3 to encode" in capsys.readouterr().err
    straight = build_index(model, image_folder, tmp_path / "straight", shard_size=8, batch_size=1)
    np.testing.assert_array_equal(_all_embeddings(killed, 5), _all_embeddings(tmp_path / "straight", 5))
    a, b = CorpusIndex.load(killed), CorpusIndex.load(tmp_path / "straight")
    assert a.rows.to_pylist() == b.rows.to_pylist() and a.bad_items == b.bad_items
    assert resumed["num_vectors"] == straight["num_vectors"]
    probe = _all_embeddings(killed, 5)[:4]
    for x, y in zip(a.search_embeddings(probe, 5), b.search_embeddings(probe, 5)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("damage", [b"\xff" * 8, (2).to_bytes(8, "little") + b"[]"])  # huge length; not an object
def test_a_damaged_shard_header_is_encoded_again_on_resume(model, tmp_path, scenes, damage):
    """A shard whose embeddings file has a damaged header (disk corruption) counts as unfinished: the resume encodes
    it again, to the same vectors (a huge header length raised OverflowError and ended the resume)."""
    data = _items_file(tmp_path, scenes[:6])
    out = tmp_path / "index"
    build_index(model, data, out, shard_size=4)
    before = _all_embeddings(out, 2)
    path = shard_paths(out, 0)["embeddings"]
    path.write_bytes(damage + path.read_bytes()[len(damage):])
    assert build_index(model, data, out, shard_size=4)["run"]["encoded_shards"] == 1
    np.testing.assert_array_equal(_all_embeddings(out, 2), before)

@pytest.mark.distributed
def test_torchrun_two_processes_equal_one(slq_dir, image_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = ["-m", "slq_hf.cli", "index", "build", "--model", str(slq_dir), "--data", str(image_folder),
               "--shard-size", "5", "--batch-size", "3", "--no-progress"]
    one = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + os.getpid() % 1000), *command, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("Index ") == 1  # only rank 0 reports
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two")]
    assert manifests[0]["num_shards"] == 8 and manifests[0]["num_vectors"] == manifests[1]["num_vectors"]
    np.testing.assert_array_equal(_all_embeddings(tmp_path / "one", 8), _all_embeddings(tmp_path / "two", 8))
    a, b = CorpusIndex.load(tmp_path / "one"), CorpusIndex.load(tmp_path / "two")
    assert a.rows.to_pylist() == b.rows.to_pylist() and a.bad_items == b.bad_items and len(a.bad_items) == 1


# ---------------------------------------------------------------------------------------------- fingerprints
def test_other_model_or_query_set_refused(slq_dir, model, image_folder, tmp_path):
    out = tmp_path / "index"
    build_index(model, image_folder, out, shard_size=16)
    index = CorpusIndex.load(out)

    retrained = SLQModel.from_pretrained(slq_dir)
    with torch.no_grad():
        query_set_tensor(retrained, "default").mul_(1.01)
    with pytest.raises(IndexMismatchError, match="query weights differ"):
        index.search(retrained, "a red circle")
    with pytest.raises(IndexMismatchError, match="query weights differ.*--overwrite"):
        build_index(retrained, image_folder, out, shard_size=16)
    other_config = SLQModel.from_backbone(str(TOY), num_queries=6)
    with pytest.raises(IndexMismatchError, match="configuration differs"):
        index.search(other_config, "a red circle")

    # A reloaded copy of the same folder, even in another dtype-free location, is the same model.
    index.search(SLQModel.from_pretrained(slq_dir), "a red circle")
    # Even with the manifest gone, shards of another model are never taken for finished ones.
    (out / "manifest.json").unlink()
    assert build_index(retrained, image_folder, out, shard_size=16)["run"]["encoded_shards"] == 3
    rebuilt = build_index(retrained, image_folder, out, shard_size=16, overwrite=True)
    assert rebuilt["run"]["skipped_shards"] == 0
    CorpusIndex.load(out).search(retrained, "a red circle")

    if not hasattr(model, "add_query_set"):
        pytest.skip("this model has no named query sets")
    model.add_query_set("documents", 8)
    sets = build_index(model, image_folder, tmp_path / "sets", shard_size=16, query_set="documents")
    assert sets["model"]["query_set"] == "documents"
    with pytest.raises(IndexMismatchError, match="query set 'documents'"):
        CorpusIndex.load(tmp_path / "sets").search(SLQModel.from_pretrained(slq_dir), "a red circle")
    assert CorpusIndex.load(tmp_path / "sets").search(model, scenes_image(image_folder), k=1)[0][0].id == \
        "scene_000.png"


def scenes_image(folder: Path) -> Path:
    return folder / "scene_000.png"


def test_changed_data_refused(model, tmp_path, scenes):
    data = _items_file(tmp_path, scenes[:6])
    out = tmp_path / "index"
    build_index(model, data, out, shard_size=4)
    assert build_index(model, data, out, shard_size=4)["run"]["encoded_shards"] == 0
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace("img5", "img5b")]) + "\n")
    with pytest.raises(IndexMismatchError, match="the data differs"):
        build_index(model, data, out, shard_size=4)
    data.write_text("\n".join(lines) + "\n")
    build_index(model, data, out, shard_size=4)  # back to the original: accepted again
    scenes[4].image.save(tmp_path / "items_images" / "1.png")  # an image file's content changes
    with pytest.raises(IndexMismatchError, match="files changed"):
        build_index(model, data, out, shard_size=4)
    with pytest.raises(IndexMismatchError, match="shard size"):
        build_index(model, data, tmp_path / "index", shard_size=3, overwrite=False)
    assert build_index(model, data, out, shard_size=4, overwrite=True)["run"]["encoded_shards"] == 2



def test_an_image_replaced_with_the_same_size_and_mtime_is_changed_data(model, tmp_path, scenes):
    """A picture replaced by another of the same byte size with its mtime kept (``cp -p``, rsync -t) is new data: the
    rebuild is refused as "files changed" instead of finding the index complete and keeping the old vectors."""
    data = _items_file(tmp_path, scenes[:2])
    picture = tmp_path / "items_images" / "1.png"
    for name, scene in (("1.png", scenes[1]), ("other.bmp", scenes[2])):  # BMPs of one size have one byte size
        scene.image.convert("RGB").save(tmp_path / "items_images" / name, format="BMP")
    other = tmp_path / "items_images" / "other.bmp"
    assert picture.stat().st_size == other.stat().st_size and picture.read_bytes() != other.read_bytes()
    out = tmp_path / "index"
    build_index(model, data, out, shard_size=4)
    kept = picture.stat()
    picture.write_bytes(other.read_bytes())
    os.utime(picture, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert picture.stat().st_size == kept.st_size and picture.stat().st_mtime_ns == kept.st_mtime_ns
    with pytest.raises(IndexMismatchError, match="files changed"):
        build_index(model, data, out, shard_size=4)

# ------------------------------------------------------------------------------------------------ precisions
@pytest.mark.parametrize(("precision", "factory"), [
    ("float32", "HNSW16"), ("float16", "Flat"), ("int8", "Flat"), ("int8", "HNSW16"), ("ubinary", "Flat"),
    ("ubinary", "HNSW16"), ("ubinary", "IVF4"), ("float32", "IVF4,PQ8x4"), ("float16", "IVF4"),
    ("float32", "PCA16,Flat"), ("float32", "L2norm,HNSW16")])  # a transform step is not exact storage
def test_quantized_search_finds_the_exact_top1(model, image_folder, tmp_path, precision, factory, scenes):
    out = tmp_path / "index"
    build_index(model, image_folder, out, shard_size=16, precision=precision, faiss_factory=factory)
    index = CorpusIndex.load(out)
    vectors = _all_embeddings(out, 3)
    queries = model.encode([{"text": s.caption} for s in scenes[:6]] + [s.image for s in scenes[6:12]]).numpy()
    exact = queries @ vectors.T  # (12, N) brute force in numpy
    scores, rows = index.search_embeddings(queries, k=3, rescore_multiplier=8)
    np.testing.assert_array_equal(rows[:, 0], exact.argmax(1))
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), atol=1e-5)  # rescored = exact scores


def test_search_settings_below_one_are_refused_not_replaced(model, image_folder, tmp_path):
    """0 used to mean "the default" for rescore_multiplier and reached FAISS as is for nprobe."""
    out = tmp_path / "index"
    build_index(model, image_folder, out, shard_size=16, precision="ubinary", faiss_factory="IVF4")
    for kwargs in ({"nprobe": 0}, {"ef_search": -1}, {"nprobe": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.* is invalid"):
            CorpusIndex.load(out, **kwargs)
    index = CorpusIndex.load(out, nprobe=4)
    queries = model.encode(["a red circle"]).numpy()
    with pytest.raises(ValueError, match="rescore_multiplier=0 is invalid"):
        index.search_embeddings(queries, k=2, rescore_multiplier=0)
    dim = queries.shape[1]
    for bad, message in [(np.full((1, dim), np.nan), "NaN or Inf"), (np.full((2, dim), np.inf), "NaN or Inf"),
                         (np.zeros((1, 1, dim)), rf"shape \(1, 1, {dim}\); expected \(Q, {dim}\)"),
                         (np.zeros((1, dim + 1)), rf"expected \(Q, {dim}\)")]:
        with pytest.raises(ValueError, match=message):
            index.search_embeddings(bad, k=2)
    assert index.search_embeddings(queries, k=2, rescore_multiplier=1)[1].shape == (1, 2)


def test_binary_codes_match_sentence_transformers_and_factory_errors():
    st_quantization = pytest.importorskip("sentence_transformers.util.quantization")
    x = np.random.default_rng(0).standard_normal((7, 44)).astype(np.float32)
    np.testing.assert_array_equal(fi.encode_codes(x, "ubinary"), st_quantization.quantize_embeddings(x, "ubinary"))
    with pytest.raises(ValueError, match="already compresses"):
        fi.resolve_factory("IVF64,PQ8", "int8")
    with pytest.raises(ValueError, match="could not parse"):
        fi.new_index(16, "Nonsense12", "float32")
    with pytest.raises(ValueError, match="precision='float64'"):
        fi.check_precision("float64")
    assert fi.default_factory(1000, 2048) == "Flat"
    assert fi.default_factory(2_000_000, 2048) == "Flat" and fi.default_factory(5_000_000, 2048) == "HNSW32"


def test_too_small_for_the_factory_says_so(model, image_folder, tmp_path):
    with pytest.raises(ValueError, match="could not train.*IVF16"):
        build_index(model, image_folder, tmp_path / "index", shard_size=16, faiss_factory="IVF64,PQ16")


# --------------------------------------------------------------------------------- eval set == slq-hf eval R@1
def test_index_of_the_eval_set_reproduces_evaluate_retrieval(model, tmp_path, scenes):
    from slq_hf.evaluation import evaluate_retrieval, load_retrieval_dataset

    (tmp_path / "scenes").mkdir()
    lines = []
    for n, scene in enumerate(scenes):
        scene.image.save(tmp_path / "scenes" / f"{n}.png")
        lines.append(json.dumps({"image": f"scenes/{n}.png", "knowledge": scene.knowledge_caption,
                                 "caption": scene.caption, "id": f"s{n}"}))
    data = tmp_path / "karr.jsonl"
    data.write_text("\n".join(lines) + "\n")
    dataset = load_retrieval_dataset(data, "karr", split=None)
    expected = evaluate_retrieval(model, dataset, batch_size=8)["metrics"]["t2i"]["R@1"]
    build_index(model, data, tmp_path / "index", format="karr", shard_size=10)
    index = CorpusIndex.load(tmp_path / "index")
    hits = index.search(model, list(dataset.texts), k=1)
    found = np.mean([h[0].position == owner for h, owner in zip(hits, dataset.text_to_image)])
    assert found == pytest.approx(expected, abs=1e-12)
    assert hits[0][0].metadata == {"captions": [dataset.texts[dataset.text_to_image.index(hits[0][0].position)]]}


def test_datasets_folder_corpus(model, tmp_path, scenes):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [s.image for s in scenes[:6]],
                                        "caption": [s.caption for s in scenes[:6]]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "hf"))
    manifest = build_index(model, tmp_path / "hf", tmp_path / "index", shard_size=4)
    assert manifest["data"]["format"] == "hf" and manifest["num_vectors"] == 6
    hit = CorpusIndex.load(tmp_path / "index").search(model, scenes[3].image, k=1)[0][0]
    assert hit.position == 3 and hit.path is None and hit.metadata == {"captions": [scenes[3].caption]}
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_a_shard_of_only_bad_items_still_loads_with_datasets(model, tmp_path, scenes):
    datasets = pytest.importorskip("datasets")
    scenes[0].image.save(tmp_path / "0.png")
    lines = [{"id": "a", "image": "0.png"}, {"id": "b", "text": scenes[1].caption},
             {"id": "gone", "image": "missing.png"}, {"id": "blank", "text": "  "},  # shard 1: nothing embeddable
             {"id": "c", "text": scenes[2].caption}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = build_index(model, tmp_path / "items.jsonl", tmp_path / "index", shard_size=2)
    assert manifest["num_shards"] == 3 and manifest["bad_items"] == 2
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "index" / "shards" / "*.parquet"),
                                 split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(zip(rows["position"], rows["id"])) == [(0, "a"), (1, "b"), (4, "c")]
    table = CorpusIndex.load(tmp_path / "index").to_dataset()
    assert table["id"] == ["a", "b", "c"]
    np.testing.assert_array_equal(np.array(table["embedding"], dtype=np.float32),
                                  _all_embeddings(tmp_path / "index", 3))


# ------------------------------------------------------------------------------------------------------ qdrant
def test_qdrant_local_export_round_trips(model, tmp_path, scenes):
    qdrant_client = pytest.importorskip("qdrant_client")
    data = _items_file(tmp_path, scenes[:10])
    build_index(model, data, tmp_path / "index", shard_size=4)
    index = CorpusIndex.load(tmp_path / "index")
    db = tmp_path / "qdrant"
    assert export_qdrant(index, "scenes", path=db) == {"collection": "scenes", "points": 10, "dim": 128}
    with pytest.raises(ValueError, match="already exists"):
        export_qdrant(index, "scenes", path=db)

    client = qdrant_client.QdrantClient(path=str(db))
    try:
        points = client.retrieve("scenes", ids=list(range(10)), with_vectors=True, with_payload=True)
        vectors = _all_embeddings(tmp_path / "index", 3)
        np.testing.assert_allclose(np.array([p.vector for p in sorted(points, key=lambda p: p.id)]), vectors,
                                   atol=1e-6)
        rows = index.rows.to_pylist()
        for point in points:
            row = rows[point.id]
            assert point.payload["id"] == row["id"] and point.payload["text"] == row["text"]
            assert point.payload["metadata"] == json.loads(row["metadata"])
            assert point.payload["slq_fingerprint"] == index.manifest["model"]["fingerprint"]
        query = model.encode([{"text": scenes[2].caption}]).numpy()[0]
        found = client.query_points("scenes", query=query.tolist(), limit=3).points
        assert [p.id for p in found] == np.argsort(-(vectors @ query))[:3].tolist()
    finally:
        client.close()
    # A server that cannot be reached is one clear error (the CLI prints it as one line), not qdrant's own exception.
    with pytest.raises(ConnectionError, match=r"Qdrant at http://127.0.0.1:9: .*left as it was"):
        export_qdrant(index, "scenes", url="http://127.0.0.1:9")


def _qdrant_ids(client, name: str) -> list[str]:
    points, _ = client.scroll(name, limit=100, with_payload=True)
    return sorted(p.payload["id"] for p in points)


def test_qdrant_overwrite_keeps_the_old_collection_until_the_new_one_is_complete(model, tmp_path, scenes,
                                                                                 monkeypatch):
    """--overwrite deleted the collection first: an export failing midway (disk full, server gone) left a partial
    one under the name. The name now keeps the old points until the new ones are all written, and a failed fresh
    export leaves no partial collection."""
    qdrant_client = pytest.importorskip("qdrant_client")
    indexes = {}
    for name, part in (("a", scenes[:6]), ("b", scenes[6:10])):
        root = tmp_path / name
        root.mkdir()
        build_index(model, _small_folder(root, part, len(part)), root / "index", shard_size=4)
        indexes[name] = CorpusIndex.load(root / "index")
    ids = {name: sorted(index.rows.column("id").to_pylist()) for name, index in indexes.items()}
    client = qdrant_client.QdrantClient(path=str(tmp_path / "db"))
    try:
        export_qdrant(indexes["a"], "scenes", client=client)
        upsert, calls = client.upsert, []

        def fail_on_second_batch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("disk full")
            return upsert(*args, **kwargs)

        monkeypatch.setattr(client, "upsert", fail_on_second_batch)
        with pytest.raises(RuntimeError, match="disk full"):
            export_qdrant(indexes["b"], "scenes", client=client, overwrite=True, batch_size=2)
        assert _qdrant_ids(client, "scenes") == ids["a"]
        assert [c.name for c in client.get_collections().collections] == ["scenes"]  # the partial one is gone
        calls.clear()
        with pytest.raises(RuntimeError, match="disk full"):  # a fresh name: nothing partial is left under it
            export_qdrant(indexes["b"], "fresh", client=client, batch_size=2)
        assert not client.collection_exists("fresh")
        monkeypatch.undo()

        for name in ("b", "a"):  # a plain collection replaced, then an alias switched
            assert export_qdrant(indexes[name], "scenes", client=client, overwrite=True)["points"] == len(ids[name])
            assert _qdrant_ids(client, "scenes") == ids[name]
            assert len(client.get_collections().collections) == 1  # the replaced collection was deleted
            found = client.query_points("scenes", query=indexes[name].embeddings(np.array([0]))[0].tolist(), limit=1)
            assert found.points[0].id == 0
        with pytest.raises(ValueError, match="already exists"):  # an alias counts as an existing name
            export_qdrant(indexes["a"], "scenes", client=client)
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_build_search_json_info_and_refusals(slq_dir, image_folder, tmp_path, capsys):
    from slq_hf.cli import main

    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(slq_dir), "--data", str(image_folder), "--out", str(out),
                 "--shard-size", "16", "--precision", "int8", "--no-progress"]) == 0
    assert "36 vectors (Flat, int8)" in capsys.readouterr().err
    assert main(["search", str(out), "--image", str(image_folder / "scene_000.png"), "--text", "a red star",
                 "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Texts first, then images (one JSON line each).
    assert [len(line["results"]) for line in lines] == [3, 3] and lines[1]["results"][0]["id"] == "scene_000.png"
    assert lines[0]["query"] == "a red star" and lines[1]["query"] == f"image {image_folder / 'scene_000.png'}"
    assert main(["index", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["resolved_factory"] == "SQ8"

    other = tmp_path / "other_slq"
    SLQModel.from_backbone(str(TOY), num_queries=4).save_pretrained(other)
    assert main(["search", str(out), "--text", "a red star", "--model", str(other)]) == 2
    assert "built by another model" in capsys.readouterr().err
    assert main(["search", str(out), "--image", str(tmp_path / "nope.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["index", "build", "--model", str(slq_dir), "--data", str(image_folder), "--out", str(out),
                 "--faiss", "IVF8,PQ4", "--precision", "ubinary"]) == 2
    assert "already compresses" in capsys.readouterr().err


def test_cli_out_that_is_a_file_and_a_recorded_model_that_moved(slq_dir, image_folder, tmp_path, capsys):
    """`index build --out` naming a file (or a path under one) is one line naming --out, before the model loads (it
    was a bare "[Errno 20] Not a directory"); `search` without --model, when the SLQ folder recorded in the index has
    moved, says the recorded folder is gone and asks for --model (it blamed a --model the user never passed)."""
    import shutil

    from slq_hf.cli import main

    afile = tmp_path / "pairs.jsonl"
    afile.write_text("{}\n")
    for out in (afile, afile / "index"):
        assert main(["index", "build", "--model", str(slq_dir), "--data", str(image_folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {afile} is a file" in err and "Traceback" not in err
    moving = tmp_path / "slq_moving"
    shutil.copytree(slq_dir, moving)
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(moving), "--data", str(image_folder), "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    moving.rename(tmp_path / "slq_moved")
    assert main(["search", str(out), "--text", "a red star"]) == 2
    err = capsys.readouterr().err
    assert f"built by the SLQ folder {moving}, which no longer exists; pass --model" in err
    assert main(["search", str(out), "--text", "a red star", "--model", str(tmp_path / "slq_moved")]) == 0

def test_cli_rerank_reorders_the_top_k(slq_dir, image_folder, tmp_path, capsys):
    pytest.importorskip("slq_hf.modeling.reranking")
    from slq_hf.cli import main

    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(slq_dir), "--data", str(image_folder), "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "--text", "a red star in the top left", "-k", "3", "--rerank", "6",
                 "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    reranked = [r["rerank_score"] for r in results]
    assert len(results) == 3 and reranked == sorted(reranked, reverse=True) and all(np.isfinite(reranked))
    # A query text is a text when reranked too, even one that looks like a file name
    for text in ("IMG_0042.JPG", "see photos/"):
        assert main(["search", str(out), "--text", text, "-k", "2", "--rerank", "3", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert main(["search", str(out), "--text", "x", "-k", "5", "--rerank", "2"]) == 2


def test_readme_search_section_runs(tmp_path, monkeypatch):
    from helpers import run_readme_example

    if "<!-- section:search-corpus -->" not in (ROOT / "README.md").read_text():
        pytest.fail("README has no search-corpus section")
    run_readme_example("search-corpus", tmp_path, monkeypatch)


def test_demo_search_writes_a_grid(slq_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo_search
    finally:
        sys.path.pop(0)
    result = demo_search.run(slq_dir, tmp_path / "demo", queries=demo_search.default_queries()[:2], limit=30)
    from PIL import Image

    grid = Image.open(result["grid"])
    assert grid.width > 5 * 64 and len(result["queries"]) == 2
    assert all(len(q["hits"]) == 5 for q in result["queries"])


# ------------------------------------------------------------------------------------------------- inputs and rebuilds
def _small_folder(tmp_path: Path, scenes, count: int = 6) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    for n, scene in enumerate(scenes[:count]):
        scene.image.save(folder / f"{n}.png")
    return folder


def test_overwrite_replaces_an_unreadable_manifest(model, tmp_path, scenes):
    """The error for a corrupt manifest says "rebuild with --overwrite"; --overwrite itself used to raise it."""
    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    (out / "manifest.json").write_text("{half a manifest")
    with pytest.raises(ValueError, match="unreadable index manifest.*--overwrite"):
        build_index(model, folder, out, shard_size=4)
    assert build_index(model, folder, out, shard_size=4, overwrite=True)["num_vectors"] == 6
    assert len(CorpusIndex.load(out)) == 6


def test_unusable_factory_refused_before_encoding_or_overwriting(model, tmp_path, scenes):
    """A factory FAISS cannot parse failed only after every shard was encoded (and after --overwrite wiped)."""
    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    before = _all_embeddings(out, 2)
    for factory in ("Nonsense12", "flat"):
        with pytest.raises(ValueError, match="could not parse"):
            build_index(model, folder, tmp_path / "fresh", shard_size=4, faiss_factory=factory)
        assert not list((tmp_path / "fresh").glob("shards/*.safetensors"))
        with pytest.raises(ValueError, match="could not parse"):
            build_index(model, folder, out, shard_size=4, faiss_factory=factory, overwrite=True)
    np.testing.assert_array_equal(_all_embeddings(out, 2), before)
    assert len(CorpusIndex.load(out)) == 6


def test_failed_overwrite_keeps_the_previous_index(model, tmp_path, scenes):
    """--overwrite deleted the old index first: a new build that then failed left nothing usable."""
    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    query = _all_embeddings(out, 2)[:2]
    expected = CorpusIndex.load(out).search_embeddings(query, k=3)
    (folder / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(BadItemError, match="zz_broken.png"):
        build_index(model, folder, out, shard_size=4, overwrite=True, strict=True)
    index = CorpusIndex.load(out)  # the earlier build, whole
    assert len(index) == 6 and index.manifest["data"]["num_items"] == 6
    for got, want in zip(index.search_embeddings(query, k=3), expected):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in out.iterdir()) == ["bad_items.jsonl", "index.faiss", "manifest.json", "shards"]
    # A successful --overwrite replaces it and leaves nothing of the old build behind.
    manifest = build_index(model, folder, out, shard_size=4, overwrite=True)
    assert manifest["num_vectors"] == 6 and manifest["bad_items"] == 1 and manifest["data"]["num_items"] == 7
    assert sorted(p.name for p in out.iterdir()) == ["bad_items.jsonl", "index.faiss", "manifest.json", "shards"]


def test_failed_or_interrupted_index_rebuild_never_leaves_a_wrong_manifest(model, tmp_path, scenes, monkeypatch):
    """Re-running a finished build dropped num_vectors from the manifest until the end (a failed rebuild left an
    index that raised KeyError), and the new index file replaced the old one before the manifest said so."""
    from slq_hf.retrieval import build as build_module

    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    with pytest.raises(ValueError, match="could not train"):
        build_index(model, folder, out, shard_size=4, faiss_factory="IVF64,PQ16")
    index = CorpusIndex.load(out)
    assert len(index) == 6 and index.manifest["index"]["precision"] == "float32"

    write = build_module.write_manifest

    def crash_before_the_final_manifest(index_dir, manifest):
        if (manifest.get("index") or {}).get("precision") == "ubinary":
            raise KeyboardInterrupt  # killed between the index file's rename and the manifest's
        return write(index_dir, manifest)

    monkeypatch.setattr(build_module, "write_manifest", crash_before_the_final_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, folder, out, shard_size=4, precision="ubinary")
    monkeypatch.setattr(build_module, "write_manifest", write)
    with pytest.raises(FileNotFoundError, match="has not finished.*resume"):
        CorpusIndex.load(out)
    assert build_index(model, folder, out, shard_size=4, precision="ubinary")["run"]["encoded_shards"] == 0
    assert CorpusIndex.load(out).manifest["index"]["precision"] == "ubinary"


def test_jsonl_byte_order_mark_and_non_utf8_lines(model, tmp_path, scenes):
    """A BOM made the first line invalid JSON (the item silently became a bad item); a Latin-1 line raised a bare
    UnicodeDecodeError naming neither file nor line."""
    lines = [json.dumps({"id": f"t{n}", "text": scene.caption}).encode() for n, scene in enumerate(scenes[:3])]
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines + [b'{"id": "latin", "text": "caf\xe9"}']) + b"\n")
    corpus = read_corpus(data)
    assert [item.id for item in corpus.items] == ["t0", "t1", "t2", "line-4"]
    assert corpus.items[0].error is None and corpus.items[0].text == scenes[0].caption
    assert "not UTF-8" in corpus.items[3].error and corpus.items[3].where == "bom.jsonl:4"
    manifest = build_index(model, data, tmp_path / "index", shard_size=4)
    assert manifest["num_vectors"] == 3 and manifest["bad_items"] == 1


def test_nan_and_infinity_in_a_jsonl_line_are_bad_items(model, slq_dir, tmp_path, scenes, capsys):
    """Python's JSON reader takes NaN / Infinity (json.dumps writes them for float NaN / inf); stored as metadata they
    came out of `slq-hf search --json` as invalid JSON. Such a line is a bad item naming the line."""
    from slq_hf.cli import main

    data = tmp_path / "items.jsonl"
    data.write_text("\n".join([json.dumps({"id": "ok", "text": scenes[0].caption, "score": 0.5}),
                               '{"id": "nan", "text": "a red circle", "score": NaN}',
                               '{"id": "inf", "text": "a blue square", "weight": -Infinity}']) + "\n")
    corpus = read_corpus(data)
    assert [item.where for item in corpus.items if item.error] == ["items.jsonl:2", "items.jsonl:3"]
    assert "NaN is not valid JSON" in corpus.items[1].error and "-Infinity" in corpus.items[2].error
    build_index(model, data, tmp_path / "index", shard_size=4, model_source=slq_dir)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "index"), "--text", "a red circle", "-k", "1", "--json"]) == 0, \
        capsys.readouterr().err
    for line in capsys.readouterr().out.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a file system that stores raw name bytes")
def test_names_and_texts_that_are_not_unicode_are_bad_items(model, tmp_path, scenes):
    """A Latin-1 file name (or a "\\udce9" escape in JSON) crashed the whole build with UnicodeEncodeError."""
    folder = _small_folder(tmp_path, scenes, 3)
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    scenes[3].image.save(os.fsdecode(raw))
    manifest = build_index(model, folder, tmp_path / "index", shard_size=2)
    index = CorpusIndex.load(tmp_path / "index")
    assert manifest["num_vectors"] == 3 and [r["id"] for r in index.rows.to_pylist()] == ["0.png", "1.png", "2.png"]
    (bad,) = index.bad_items
    assert bad["id"] == "caf\ufffd.png" and "not valid UTF-8" in bad["reason"]

    data = tmp_path / "items.jsonl"
    data.write_text('{"id": "ok", "text": "a red circle"}\n{"id": "s", "text": "caf\\udce9"}\n')
    manifest = build_index(model, data, tmp_path / "items_index", shard_size=4)
    (bad,) = CorpusIndex.load(tmp_path / "items_index").bad_items
    assert manifest["num_vectors"] == 1 and bad["where"] == "items.jsonl:2" and "surrogate" in bad["reason"]


def test_duplicate_ids_are_refused_or_made_unique(model, tmp_path, scenes):
    """A Corpus given in Python, or a Karpathy file with one file name in two folders, was indexed with two
    items under one id."""
    from slq_hf.retrieval import Corpus, CorpusItem

    twice = Corpus([CorpusItem("a", text="red"), CorpusItem("b", text="green"), CorpusItem("a", text="blue")],
                   "memory", "items")
    with pytest.raises(ValueError, match="corpus item 2: id 'a' is also the id of corpus item 0"):
        build_index(model, twice, tmp_path / "index")
    assert not (tmp_path / "index").exists()

    for sub, scene in zip(("a", "b"), scenes):
        (tmp_path / sub).mkdir()
        scene.image.save(tmp_path / sub / "0.png")
    karpathy = {"images": [{"filepath": sub, "filename": "0.png", "split": "test", "sentences": [{"raw": s.caption}]}
                           for sub, s in zip(("a", "b"), scenes)]}
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    corpus = read_corpus(tmp_path / "karpathy.json", "karpathy", image_root=tmp_path)
    assert [item.id for item in corpus.items] == ["a/0.png", "b/0.png"]


def test_home_relative_image_paths_resolve_in_hits(model, tmp_path, scenes, monkeypatch):
    """An item image "~/x.png" was read from the home folder but its hit.path was ROOT/~/x.png."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    scenes[0].image.save(home / "mine.png")
    data = tmp_path / "items.jsonl"
    data.write_text('{"id": "mine", "image": "~/mine.png"}\n{"id": "t", "text": "a red circle"}\n')
    build_index(model, data, tmp_path / "index", shard_size=4)
    hit = CorpusIndex.load(tmp_path / "index").search(model, scenes[0].image, k=1)[0][0]
    assert hit.id == "mine" and hit.image == "~/mine.png" and hit.path == str(home / "mine.png")


def test_qdrant_export_refuses_batch_size_below_one(model, tmp_path, scenes):
    """batch_size=-1 exported no point and reported them all; 0 raised range()'s own error."""
    pytest.importorskip("qdrant_client")
    folder = _small_folder(tmp_path, scenes, 3)
    build_index(model, folder, tmp_path / "index", shard_size=4)
    for size in (-1, 0, True):
        with pytest.raises(ValueError, match=f"batch_size={size!r} is invalid"):
            export_qdrant(tmp_path / "index", "c", path=tmp_path / "db", batch_size=size)


def test_eval_only_options_refused_for_folder_and_items(tmp_path, scenes, slq_dir, capsys):
    """--split / --image-root were silently ignored for a folder or items JSONL: the whole corpus was indexed."""
    from slq_hf.cli import main

    folder = _small_folder(tmp_path, scenes, 2)
    with pytest.raises(ValueError, match=r"split \(--split\) only apply to the evaluation layouts"):
        read_corpus(folder, split="test")
    data = tmp_path / "items.jsonl"
    data.write_text('{"id": "t", "text": "a red circle"}\n')
    with pytest.raises(ValueError, match="image_root.*'items'"):
        read_corpus(data, image_root=tmp_path)
    assert main(["index", "build", "--model", str(slq_dir), "--data", str(folder), "--out", str(tmp_path / "i"),
                 "--split", "test", "--no-progress"]) == 2
    assert "only apply to the evaluation layouts" in capsys.readouterr().err


def test_killed_overwrite_then_rerun_still_keeps_the_previous_index(model, tmp_path, scenes, monkeypatch):
    """After a killed --overwrite build (nothing put back), re-running it must keep the build before that one."""
    from slq_hf.retrieval import build as build_module

    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    before = _all_embeddings(out, 2)
    (folder / "zz_broken.png").write_bytes(b"not a png")
    with monkeypatch.context() as patch:
        patch.setattr(build_module, "put_back", lambda entries, backup: None)  # a SIGKILL runs no clean-up
        with pytest.raises(BadItemError):
            build_index(model, folder, out, shard_size=4, overwrite=True, strict=True)
    assert (out / "manifest.json").is_file() and (out / ".replaced" / "index.faiss").is_file()
    with pytest.raises(BadItemError):
        build_index(model, folder, out, shard_size=4, overwrite=True, strict=True)
    np.testing.assert_array_equal(_all_embeddings(out, 2), before)
    assert len(CorpusIndex.load(out)) == 6 and not (out / ".replaced").exists()


# ---------------------------------------------------------------------------------------- search settings and scores
def test_a_torch_upgrade_keeps_the_index_usable(model, tmp_path, scenes, monkeypatch, capsys):
    """SLQConfig.to_dict stamps the running torch version; it was part of the model fingerprint, so upgrading torch
    made every index refuse search ("another model") and refuse resume (a full re-encode with --overwrite)."""
    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    build_index(model, folder, out, shard_size=4)
    monkeypatch.setattr(torch, "__version__", "99.0.0")  # the same weights and config, read by a newer torch
    assert CorpusIndex.load(out).search(model, folder / "0.png", k=1)[0][0].id == "0.png"
    capsys.readouterr()
    assert build_index(model, folder, out, shard_size=4)["run"]["skipped_shards"] == 2


@pytest.mark.parametrize("factory", ["L2norm,HNSW8", "IVF2_HNSW4,Flat", "IDMap,HNSW8"])
def test_ef_search_reaches_an_hnsw_inside_a_wrapper(model, tmp_path, scenes, factory):
    """FAISS returns the HNSW behind a transform, an IDMap or an IVF's quantizer as a plain Index: ef_search (and
    the default 128) never reached it, so it searched with FAISS's efSearch=16 whatever was asked."""
    import faiss

    out = tmp_path / "index"
    build_index(model, _small_folder(tmp_path, scenes), out, shard_size=4, faiss_factory=factory)
    index = CorpusIndex.load(out, ef_search=77).index
    if hasattr(index, "index"):  # IndexPreTransform / IndexIDMap
        hnsw_index = faiss.downcast_index(index.index)
    else:
        hnsw_index = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert hnsw_index.hnsw.efSearch == 77


def test_binary_ivf_keeps_its_hnsw_quantizer(model, tmp_path, scenes):
    """IVFn_HNSWm at ubinary was written as FAISS "BIVFn_BHNSWm", which FAISS reads as a flat quantizer."""
    import faiss

    out = tmp_path / "index"
    build_index(model, _small_folder(tmp_path, scenes), out, shard_size=4, precision="ubinary",
                faiss_factory="IVF2_HNSW4")
    index = CorpusIndex.load(out, ef_search=55).index
    quantizer = faiss.downcast_IndexBinary(index.quantizer)
    assert isinstance(quantizer, faiss.IndexBinaryHNSW) and quantizer.hnsw.efSearch == 55


def test_idmap_factory_builds_and_searches_exactly(model, tmp_path, scenes):
    """FAISS IDMap indexes refuse add(); the build failed with a raw RuntimeError after encoding the whole corpus."""
    out = tmp_path / "index"
    build_index(model, _small_folder(tmp_path, scenes), out, shard_size=4, faiss_factory="IDMap,Flat")
    index = CorpusIndex.load(out)
    vectors = _all_embeddings(out, 2)
    queries = model.encode([{"text": s.caption} for s in scenes[:4]]).numpy()
    scores, rows = index.search_embeddings(queries, k=6)
    exact = queries @ vectors.T
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1, kind="stable"))
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1], atol=1e-5)


@pytest.mark.parametrize(("precision", "factory"), [("float32", "Flat"), ("ubinary", "Flat"), ("int8", "HNSW8")])
def test_a_model_without_normalize_is_searched_by_cosine(tmp_path, scenes, precision, factory):
    """With normalize=False the index ranked by raw inner products (scores ~80) while slq-hf eval, the Qdrant
    export and SearchHit's documentation use cosine: another order than theirs."""
    model = SLQModel.from_backbone(str(TOY), num_queries=8, normalize=False)
    out = tmp_path / "index"
    build_index(model, _small_folder(tmp_path, scenes), out, shard_size=4, precision=precision, faiss_factory=factory)
    vectors = _all_embeddings(out, 2)
    queries = model.encode([{"text": s.caption} for s in scenes[:6]]).numpy()
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).T
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # the model really does not normalise
    scores, rows = CorpusIndex.load(out).search_embeddings(queries, k=6, rescore_multiplier=2)
    np.testing.assert_array_equal(rows, np.argsort(-cosine, axis=1, kind="stable"))
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, rows, 1), atol=1e-5)


def test_rerank_reads_stored_images_whose_path_looks_like_a_text(model, tmp_path, scenes):
    """Reranking passed each item's image as a str: "my pics/photo 1" (a space, no extension) is a text by the
    input rules, so a text query was refused ("two texts") and an image query scored the paths as captions."""
    from slq_hf.modeling.reranking import rerank
    from slq_hf.retrieval.search import rerank_hits

    (tmp_path / "my pics").mkdir()
    lines = []
    for n, scene in enumerate(scenes[:4]):
        scene.image.save(tmp_path / "my pics" / f"photo {n}", format="PNG")
        lines.append(json.dumps({"id": f"p{n}", "image": f"my pics/photo {n}"}))
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    build_index(model, tmp_path / "items.jsonl", tmp_path / "index")
    index, query = CorpusIndex.load(tmp_path / "index"), scenes[0].caption
    reranked = rerank_hits(model, query, index.search(model, query, k=4)[0])
    expected = rerank(model.backbone, model.processor, query, [s.image for s in scenes[:4]]).scores
    assert sorted(hit.id for hit in reranked) == ["p0", "p1", "p2", "p3"]
    for hit in reranked:
        assert hit.rerank_score == pytest.approx(float(expected[int(hit.id[1:])]), abs=1e-4)
    with pytest.raises(ValueError, match="every candidate must be a text"):  # image vs images: refused, not guessed
        rerank_hits(model, scenes[0].image, index.search(model, scenes[0].image, k=2)[0])


def test_cli_search_with_another_query_set(tmp_path, scenes, capsys):
    """A model with "query" and "document" sets: the corpus is embedded with one, the queries need the other;
    `slq-hf search` had no way to ask for it (queries always went through the corpus's set)."""
    from slq_hf.cli import main

    model = SLQModel.from_backbone(str(TOY), num_queries=8)
    if not hasattr(model, "add_query_set"):
        pytest.skip("this model has no named query sets")
    model.add_query_set("query")
    model.add_query_set("document")
    with torch.no_grad():
        query_set_tensor(model, "query").mul_(1.5)
    model.save_pretrained(tmp_path / "slq")
    folder, out = _small_folder(tmp_path, scenes), tmp_path / "index"
    assert main(["index", "build", "--model", str(tmp_path / "slq"), "--data", str(folder), "--out", str(out),
                 "--query-set", "document", "--no-progress"]) == 0
    text, seen = scenes[0].caption, []
    for query_set in ("query", "document"):
        assert main(["search", str(out), "--text", text, "-k", "6", "--json", "--query-set", query_set]) == 0
        hits = json.loads(capsys.readouterr().out)["results"]
        with model.use_query_set(query_set):
            query = model.encode([{"text": text}]).numpy()[0]
        vectors = _all_embeddings(out, 1)
        expected = {f"{n}.png": float(vectors[n] @ query) for n in range(6)}  # rows in file order 0..5
        assert [hit["score"] for hit in hits] == pytest.approx([expected[hit["id"]] for hit in hits], abs=1e-5)
        seen.append(query)
    assert np.abs(seen[0] - seen[1]).max() > 1e-3  # the two sets really embed the query differently


def test_numpy_integers_are_integers_for_search_settings(model, tmp_path, scenes):
    """k=np.int64(3) (from an array's length or argmax) was refused as "k=np.int64(3) is invalid"."""
    out = tmp_path / "index"
    build_index(model, _small_folder(tmp_path, scenes), out, shard_size=4, precision="ubinary", faiss_factory="IVF2")
    index = CorpusIndex.load(out, nprobe=np.int64(2), ef_search=np.int32(64))
    queries = model.encode(["a red circle"]).numpy()
    scores, rows = index.search_embeddings(queries, k=np.int64(3), rescore_multiplier=np.int64(2))
    exact = queries @ _all_embeddings(out, 2).T
    np.testing.assert_array_equal(rows[0], np.argsort(-exact[0], kind="stable")[:3])
    assert len(index.search(model, "a red circle", k=np.arange(4)[-1])[0]) == 3
