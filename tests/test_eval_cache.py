"""The evaluation embedding cache (slq_hf/evaluation/encoding.py) keys on everything that changes an embedding: each
setting flipped alone must miss (and give the uncached vectors), identical settings must hit, and settings that
cannot change an embedding (temperature, a query set that is not active) must not cost a re-encode."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from slq_hf import SLQModel
from slq_hf.evaluation import RetrievalDataset, encode_inputs, evaluate_retrieval
from slq_hf.evaluation.encoding import _input_limits

from helpers import scene

TEXTS = ["a red square", "a green square", "a blue square"]
IMAGES = [scene(64, 64, (220, 30, 30)), scene(64, 64, (30, 200, 30)), scene(48, 80, (30, 30, 220))]


@pytest.fixture
def model(tiny_backbone_path):
    return SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=4, dtype=torch.float32)


def _encode(model, tmp_path, inputs=TEXTS, **kwargs):
    stats: dict = {}
    out = encode_inputs(model, inputs, cache_dir=tmp_path / "cache", batch_size=2, show_progress_bar=False,
                        stats=stats, **kwargs)
    return out, stats["cache"]


def _uncached(model, inputs=TEXTS, **kwargs):
    return encode_inputs(model, inputs, batch_size=2, show_progress_bar=False, **kwargs)


def _seed(model, tmp_path, inputs=TEXTS, **kwargs):
    """Fill the cache and check that the same call hits and returns the same vectors."""
    first, status = _encode(model, tmp_path, inputs, **kwargs)
    assert status == "miss"
    again, status = _encode(model, tmp_path, inputs, **kwargs)
    assert status == "hit"
    assert torch.equal(first, again)
    return first


def _flip_query_set(model):
    model.add_query_set("other", 4)
    model.set_active_query_set("other")


def _flip_queries(model):
    with torch.no_grad():
        model.queries.add_(0.5)


def _flip_normalize(model):
    model.config.normalize = not model.config.normalize


def _flip_dtype(model):
    model.backbone.to(torch.bfloat16)


def _flip_backbone_weights(model):
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.mul_(1.5)


def _flip_image_budget(model):
    model.processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 48 * 48}


def _flip_chat_template(model):
    model.processor.chat_template = model.processor.chat_template.replace("assistant", "model")


def _flip_head(model):
    model.config.pooling = "last"


FLIPS = {
    "active query set": _flip_query_set,
    "query values": _flip_queries,
    "normalisation": _flip_normalize,
    "dtype": _flip_dtype,
    "backbone weights": _flip_backbone_weights,
    "image budget": _flip_image_budget,
    "chat template": _flip_chat_template,
    "pooling": _flip_head,
}


@pytest.mark.parametrize("name", list(FLIPS))
@pytest.mark.parametrize("inputs", [TEXTS, IMAGES], ids=["texts", "images"])
def test_each_setting_flipped_misses_and_gives_the_uncached_vectors(name, inputs, model, tmp_path):
    before = _seed(model, tmp_path, inputs)
    FLIPS[name](model)
    after, status = _encode(model, tmp_path, inputs)
    assert status == "miss", name
    expected = _uncached(model, inputs)
    torch.testing.assert_close(after, expected, atol=0, rtol=0)
    if name != "image budget" or inputs is IMAGES:  # texts do not depend on the image budget
        assert not torch.allclose(after, before, atol=1e-6), f"{name} did not change the embeddings"


def test_switching_query_sets_back_and_forth_hits_each_sets_own_vectors(model, tmp_path):
    default = _seed(model, tmp_path)
    model.add_query_set("other", 4)
    with model.use_query_set("other"):
        other, status = _encode(model, tmp_path)
        assert status == "miss"
        torch.testing.assert_close(other, _uncached(model), atol=0, rtol=0)
    back, status = _encode(model, tmp_path)
    assert status == "hit" and torch.equal(back, default)
    with model.use_query_set("other"):
        again, status = _encode(model, tmp_path)
        assert status == "hit" and torch.equal(again, other)


def test_instruction_and_encode_kwargs_are_part_of_the_key(model, tmp_path):
    _seed(model, tmp_path)
    _, status = _encode(model, tmp_path, instruction="Describe the colour.")
    assert status == "miss"
    _, status = _encode(model, tmp_path, instruction="Describe the colour.")
    assert status == "hit"


def test_settings_that_cannot_change_an_embedding_still_hit(model, tmp_path):
    first = _seed(model, tmp_path)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)  # the training temperature
    model.add_query_set("unused", 4)  # a set that is not active
    out, status = _encode(model, tmp_path)
    assert status == "hit" and torch.equal(out, first)


def test_the_library_image_limits_are_part_of_the_key(model, tmp_path, monkeypatch):
    import importlib

    limits = {k: v for k, v in _input_limits().items() if isinstance(v, int) and not isinstance(v, bool)}
    assert limits  # the decode/pixel limits of the input modules
    _seed(model, tmp_path, IMAGES)
    for qualified, value in limits.items():
        module, name = qualified.rsplit(".", 1)
        with monkeypatch.context() as patch:
            patch.setattr(importlib.import_module(module), name, value // 2 + 1)
            _, status = _encode(model, tmp_path, IMAGES)
            assert status == "miss", qualified


def test_sentence_transformers_truncation_prompts_and_normalize(model, tmp_path):
    from sentence_transformers.base.modules import Normalize  # noqa: F401  (the module type the key must see)

    from slq_hf.integrations.sentence_transformers import to_sentence_transformer

    st = to_sentence_transformer(model)
    full = _seed(st, tmp_path)
    st.truncate_dim = 8
    truncated, status = _encode(st, tmp_path)
    assert status == "miss" and truncated.shape[1] == 8
    st.truncate_dim = None
    _, status = _encode(st, tmp_path, encode_kwargs={"truncate_dim": 6})
    assert status == "miss"
    _, status = _encode(st, tmp_path)
    assert status == "hit"
    st.prompts = {"query": "Find the picture:", "document": ""}
    st.default_prompt_name = "query"
    prompted, status = _encode(st, tmp_path)
    assert status == "miss" and not torch.allclose(prompted, full, atol=1e-6)
    st.default_prompt_name = None
    # Dropping the Normalize module changes no weights but every vector's length.
    del st[len(st) - 1]
    unnormalised, status = _encode(st, tmp_path)
    assert status == "miss"
    torch.testing.assert_close(unnormalised, _uncached(st), atol=0, rtol=0)
    inner = next(m for m in st.modules() if isinstance(m, SLQModel))
    inner.add_query_set("other", 4)
    inner.set_active_query_set("other")
    switched, status = _encode(st, tmp_path)
    assert status == "miss"  # the query set of an SLQ model inside a SentenceTransformer counts too
    torch.testing.assert_close(switched, _uncached(st), atol=0, rtol=0)


def test_evaluate_retrieval_reports_the_active_sets_recall(model, tmp_path):
    """The reported bug: after switching sets, the cached run reported the default set's recall."""
    data = RetrievalDataset.from_pairs(IMAGES, TEXTS, name="squares")
    cache = tmp_path / "cache"
    evaluate_retrieval(model, data, cache_dir=cache, show_progress_bar=False)
    model.add_query_set("other", 4)
    model.set_active_query_set("other")
    cached = evaluate_retrieval(model, data, cache_dir=cache, show_progress_bar=False, return_embeddings=True)
    fresh = evaluate_retrieval(model, data, show_progress_bar=False, return_embeddings=True)
    assert {part: stats["cache"] for part, stats in cached["encode"].items()} == {"image": "miss", "text": "miss"}
    for part in ("image", "text"):
        torch.testing.assert_close(cached["embeddings"][part], fresh["embeddings"][part], atol=0, rtol=0)
    assert cached["metrics"] == fresh["metrics"]


def test_a_callable_needs_a_model_id(tmp_path):
    def encoder(inputs, **_):
        return torch.ones(len(inputs), 3)

    with pytest.raises(ValueError, match="model_id"):
        _encode(encoder, tmp_path)
    _, status = _encode(encoder, tmp_path, model_id="ones-v1")
    assert status == "miss"
    _, status = _encode(encoder, tmp_path, model_id="ones-v2")
    assert status == "miss"
    _, status = _encode(encoder, tmp_path, model_id="ones-v1")
    assert status == "hit"


def test_a_datasets_image_replaced_under_the_same_path_misses(model, tmp_path):
    """Image cells that hold only a path (an ``imagefolder`` dataset) are keyed on the file's size and mtime too,
    like image files: replacing the picture under the same name is a miss, never the old picture's vectors."""
    pytest.importorskip("datasets")
    import json

    from slq_hf.evaluation import load_retrieval_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    scene(64, 64, (220, 30, 30)).save(folder / "a.png")
    scene(64, 64, (30, 200, 30)).save(folder / "b.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": f"scene {n}"}) + "\n"
                                                   for n in "ab"))

    def images():
        found = load_retrieval_dataset(folder, "hf", "train").images
        assert found[0].raw().get("bytes") is None  # path-only cells: what this test is about
        return found

    first = _seed(model, tmp_path, images())
    scene(80, 40, (30, 30, 220)).save(folder / "a.png")  # another picture, same name
    out, status = _encode(model, tmp_path, images())
    assert status == "miss" and not torch.equal(out[0], first[0])
    torch.testing.assert_close(out, _uncached(model, images()), atol=0, rtol=0)


def _palette_image(colour: tuple[int, int, int]) -> Image.Image:
    """A "P" image: pixel indices 0 (grey) and 1 (``colour``); only the palette says what colour index 1 is."""
    image = Image.new("P", (48, 48), 0)
    image.putpalette([128, 128, 128, *colour] + [0] * (256 * 3 - 6))
    image.paste(1, (12, 12, 36, 36))
    return image


def _jpeg(orientation: int | None) -> Image.Image:
    picture = Image.new("RGB", (64, 32), (220, 30, 30))
    picture.paste((30, 30, 220), (0, 0, 32, 32))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # EXIF Orientation: 6 = rotate 90 degrees to display
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


@pytest.mark.parametrize("pair", ["palette", "exif orientation"])
def test_in_memory_images_key_on_the_pixels_the_model_sees(model, tmp_path, pair):
    """Two PIL images with the same stored pixel bytes but another palette (or EXIF orientation) look different to
    the model: the second must miss, not get the first one's vectors."""
    first, second = ((_palette_image((220, 30, 30)), _palette_image((30, 30, 220))) if pair == "palette"
                     else (_jpeg(None), _jpeg(6)))
    assert first.tobytes() == second.tobytes()  # what the old key hashed
    seeded = _seed(model, tmp_path, [first])
    out, status = _encode(model, tmp_path, [second])
    assert status == "miss"
    torch.testing.assert_close(out, _uncached(model, [second]), atol=0, rtol=0)
    assert not torch.allclose(out, seeded, atol=1e-6)


def _replace_keeping_size_and_mtime(path, picture: Image.Image) -> None:
    """What ``cp -p other.bmp path`` does: another picture of the same byte size, the old mtime kept."""
    import os

    before = os.stat(path)
    picture.save(path)
    assert os.stat(path).st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_image_file_replaced_with_the_same_size_and_mtime_misses(model, tmp_path):
    """Image files are keyed on their bytes: the old path + size + mtime key served the replaced picture's vectors
    after ``cp -p`` / ``touch -r`` / rsync -t (same size, same mtime)."""
    from pathlib import Path

    path = Path(tmp_path / "a.bmp")
    scene(64, 64, (220, 30, 30)).save(path)
    first = _seed(model, tmp_path, [path])
    _replace_keeping_size_and_mtime(path, scene(64, 64, (30, 30, 220)))
    out, status = _encode(model, tmp_path, [path])
    assert status == "miss"
    torch.testing.assert_close(out, _uncached(model, [path]), atol=0, rtol=0)
    assert not torch.allclose(out, first, atol=1e-6)
    # The same bytes under another name are the same picture: a hit.
    copy = tmp_path / "copy.bmp"
    copy.write_bytes(path.read_bytes())
    again, status = _encode(model, tmp_path, [copy])
    assert status == "hit" and torch.equal(again, out)


def test_a_datasets_path_only_image_replaced_with_the_same_size_and_mtime_misses(model, tmp_path):
    pytest.importorskip("datasets")
    import json

    from slq_hf.evaluation import load_retrieval_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    scene(64, 64, (220, 30, 30)).save(folder / "a.bmp")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.bmp", "text": "scene a"}) + "\n")

    def images():
        found = load_retrieval_dataset(folder, "hf", "train").images
        assert found[0].raw().get("bytes") is None
        return found

    first = _seed(model, tmp_path, images())
    _replace_keeping_size_and_mtime(folder / "a.bmp", scene(64, 64, (30, 30, 220)))
    out, status = _encode(model, tmp_path, images())
    assert status == "miss" and not torch.allclose(out, first, atol=1e-6)
    torch.testing.assert_close(out, _uncached(model, images()), atol=0, rtol=0)
