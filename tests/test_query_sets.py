"""Named query sets: several embedders on one frozen backbone, computed on one prompt pass, next to generate().

- ``encode(inputs, query_sets=[...])`` equals one ``encode`` per active set (<= 1e-5) on every tiny backbone family,
  with ONE prompt pass per batch (block mask + per-set offsets) except on sliding-window backbones (Gemma 3), which
  fall back to one pass per set; negative controls (no block mask, wrong offsets) show the comparison can fail.
- training: ``forward(query_sets=...)`` on a pair batch gives each set the loss and gradient it gets alone, with
  one prompt pass per side; ``joint_query_sets`` lets the plain Trainer train several sets.
- files: one queries-only safetensors file per set, reloaded by ``from_pretrained``; ``load_query_set`` onto another
  model with the same backbone; width mismatches refused naming both widths.
- sentence-transformers: ``encode_query`` / ``encode_document`` use the "query" / "document" sets (remote code).
- one loaded model embeds and generates, interleaved, like two separate models, with one copy of the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import slq_hf.modeling.prefix_cache as prefix_cache
from slq_hf import SLQModel, SLQModelOutput
from slq_hf.modeling.backbones import block_mask_allowed
from slq_hf.modeling.checkpoint import read_header
from slq_hf.testing import TINY_FAMILIES
from slq_hf.training import SLQDataCollator

from helpers import count_prompt_passes, scene, sharpen_attention

NUM_QUERIES = 4
DOC_QUERIES = 3  # sets may differ in size
TOL = 1e-5
GRAD_REL_TOL = 1e-4
CONTROL_MIN_DIFF = 10 * TOL
FAMILIES = sorted(TINY_FAMILIES)
SETS = ["default", "query", "document"]


# Texts of different lengths and images of two sizes in one batch: rows are padded, rope deltas differ per row.
ITEMS = ["a green triangle", scene(64, 64, (255, 0, 0)),
         {"image": scene(96, 64, (0, 0, 255)), "text": "what shape is this? describe the image."}, "hi",
         "the quick brown fox jumps over a red square in the top left corner"]
COLOURS = [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)), ("cyan", (0, 255, 255))]
PAIRS = [{"image": scene(64, 64, rgb), "text": f"a {name} square"} for name, rgb in COLOURS]


def _with_sets(model: SLQModel) -> SLQModel:
    model.add_query_set("query")
    model.add_query_set("document", num_queries=DOC_QUERIES)
    return model


def _new(path: str, sharpen: bool = True) -> SLQModel:
    model = SLQModel.from_backbone(path, num_queries=NUM_QUERIES)
    if sharpen:
        sharpen_attention(model.backbone)
    return _with_sets(model)


@pytest.fixture(scope="module")
def models(tiny_backbone_path):
    """family -> SLQModel with sets default (4), query (4), document (3); shared by the read-only tests."""
    cache: dict[str, SLQModel] = {}

    def get(family: str) -> SLQModel:
        if family not in cache:
            cache[family] = _new(tiny_backbone_path(family))
        return cache[family]

    return get


@pytest.fixture
def qwen(tiny_backbone_path) -> SLQModel:
    """A fresh tiny Qwen3-VL SLQ model with the three sets, for tests that change it."""
    return _new(tiny_backbone_path("qwen3_vl"))


def _alone(model: SLQModel, items) -> dict[str, torch.Tensor]:
    out = {}
    for name in SETS:
        with model.use_query_set(name):
            out[name] = model.encode(items)
    return out


# ------------------------------------------------------------------------------------------- one pass = alone
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_query_sets_in_one_pass_equals_each_set_alone(models, family, monkeypatch):
    model = models(family)
    calls = count_prompt_passes(monkeypatch)
    together = model.encode(ITEMS, query_sets=SETS, batch_size=8)
    shared = block_mask_allowed(model.spec, model.backbone)
    assert shared == (family != "gemma3")  # Gemma 3 has sliding-window layers
    # One prompt pass for the single batch and all three sets; the fallback builds no cache (full pass per set).
    assert len(calls) == (1 if shared else 0)
    alone = _alone(model, ITEMS)
    diffs = {name: (together[name] - alone[name]).abs().max().item() for name in SETS}
    print(f"{family}: one pass vs alone, max |diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
          + ("" if shared else " (sliding-window fallback: one pass per set)"))
    assert all(diff <= TOL for diff in diffs.values()), diffs
    assert set(together) == set(SETS) and together["query"].shape == (len(ITEMS), model.config.embedding_dim)
    # The sets are different embedders: a mix-up between them could not hide behind equal values.
    assert (together["query"] - together["document"]).abs().max() > 0.05


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
@pytest.mark.parametrize("broken", ["no block mask", "offsets not restarted per set"])
def test_one_pass_without_block_mask_or_offsets_is_detected(models, family, broken, monkeypatch):
    """Negative controls: sets that see each other, or later sets placed after earlier ones, change the result."""
    model = models(family)
    if broken == "no block mask":
        monkeypatch.setattr(prefix_cache, "block_causal_mask",
                            lambda sizes, device=None: torch.ones(sum(sizes), sum(sizes), dtype=torch.bool).tril())
    else:
        monkeypatch.setattr(prefix_cache, "query_offsets", lambda sizes, device=None: torch.arange(sum(sizes)))
    together = model.encode(ITEMS, query_sets=SETS)
    alone = _alone(model, ITEMS)
    assert (together["default"] - alone["default"]).abs().max() <= TOL  # the first set is unaffected either way
    assert (together["document"] - alone["document"]).abs().max() > CONTROL_MIN_DIFF


def test_single_set_and_order(models):
    model = models("qwen3_vl")
    one = model.encode(ITEMS, query_sets=["document"])
    reordered = model.encode(ITEMS, query_sets=["document", "default"])
    assert list(reordered) == ["document", "default"]
    assert (one["document"] - reordered["document"]).abs().max() <= TOL
    assert (model.encode(ITEMS) - reordered["default"]).abs().max() <= TOL
    empty = model.encode([], query_sets=SETS)
    assert all(v.shape == (0, model.config.embedding_dim) for v in empty.values())


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["qwen3_vl", "llava", "gemma3"])
def test_joint_training_equals_each_set_trained_alone(tiny_backbone_path, family, monkeypatch):
    """forward(query_sets=...) on a pair batch: per-set losses and gradients equal each set's own step, and the
    prompt of each side runs once for all sets (Gemma 3: one pass per set)."""
    model = _new(tiny_backbone_path(family))
    model.train()
    batch = SLQDataCollator(model.processor)(PAIRS)
    params = {name: model.get_query_set(name) for name in SETS}

    calls = count_prompt_passes(monkeypatch)
    out = model(**batch, query_sets=SETS)
    assert isinstance(out, SLQModelOutput) and set(out.losses) == set(SETS)
    out.loss.backward()
    # One prompt pass per side (query + positive) for all sets; the fallback runs one (prefix-cache) pass per set.
    assert len(calls) == 2 * (1 if block_mask_allowed(model.spec, model.backbone) else len(SETS))
    joint = {name: p.grad.clone() for name, p in params.items()}
    assert torch.allclose(out.loss, torch.stack(list(out.losses.values())).mean())

    for name, param in params.items():
        for p in params.values():
            p.grad = None
        with model.use_query_set(name):
            alone = model(**batch)
        alone.loss.backward()
        assert abs(alone.loss.item() - out.losses[name].item()) <= TOL
        assert (alone.pooler_output - out.pooler_outputs[name]).abs().max() <= TOL
        # The joint loss is the mean over K sets, so each set's gradient is its own gradient / K.
        expected = param.grad / len(SETS)
        rel = ((joint[name] - expected).norm() / expected.norm()).item()
        print(f"{family} {name}: joint vs alone grad rel diff {rel:.1e}")
        assert expected.norm() > 0 and rel <= GRAD_REL_TOL
        others = [p.grad for other, p in params.items() if other != name]
        assert all(g is None or g.abs().max() == 0 for g in others), "a set's loss must not reach the other sets"


def test_plain_trainer_trains_joint_query_sets(qwen, tmp_path):
    model = qwen
    before = {name: model.get_query_set(name).detach().clone() for name in SETS}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.joint_query_sets = ["query", "document"]
    args = TrainingArguments(str(tmp_path / "out"), learning_rate=1e-2, per_device_train_batch_size=2, max_steps=2,
                             remove_unused_columns=False, use_cpu=True, report_to="none", disable_tqdm=True,
                             save_strategy="no")
    Trainer(model=model, args=args, train_dataset=PAIRS, data_collator=SLQDataCollator(model.processor)).train()
    assert not torch.equal(model.get_query_set("query").detach(), before["query"])
    assert not torch.equal(model.get_query_set("document").detach(), before["document"])
    assert torch.equal(model.queries.detach(), before["default"])  # not in joint_query_sets: untouched
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())


# ------------------------------------------------------------------------------------------------------- files
def test_save_pretrained_writes_one_queries_only_file_per_set_and_reloads(qwen, tmp_path):
    model = qwen
    model.set_active_query_set("query")
    model.save_pretrained(tmp_path / "slq")
    folder = tmp_path / "slq"
    assert set(load_file(folder / "model.safetensors")) == {"queries", "logit_scale"}
    for name, size in [("query", NUM_QUERIES), ("document", DOC_QUERIES)]:
        tensors = load_file(folder / "query_sets" / f"{name}.safetensors")
        assert list(tensors) == ["queries"] and tensors["queries"].shape == (size, model.config.hidden_size)
    index = json.loads((folder / "query_sets" / "sets.json").read_text())
    assert index["active"] == "query" and list(index["sets"]) == ["query", "document"]

    reloaded = SLQModel.from_pretrained(folder)
    assert reloaded.query_sets == SETS and reloaded.active_query_set == "query"
    for name in SETS:
        assert torch.equal(reloaded.get_query_set(name), model.get_query_set(name).detach())
    assert (reloaded.encode(ITEMS[:2]) - model.encode(ITEMS[:2])).abs().max() <= TOL  # both encode with "query"

    # A removed set does not come back from stale files; a model with only the default set writes no query_sets/.
    model.remove_query_set("query")
    assert model.active_query_set == "default"
    model.save_pretrained(folder)
    assert SLQModel.from_pretrained(folder).query_sets == ["default", "document"]
    model.remove_query_set("document")
    model.save_pretrained(folder)
    assert not (folder / "query_sets").exists()


def test_load_query_set_onto_another_model_with_the_same_backbone(qwen, tiny_backbone_path, tmp_path):
    source = qwen
    source.save_query_set("document", tmp_path / "document.safetensors")
    source.save_pretrained(tmp_path / "slq")
    target = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    sharpen_attention(target.backbone)
    assert target.query_sets == ["default"]

    assert target.load_query_set(tmp_path / "document.safetensors") == "document"  # the name comes from the file
    assert target.load_query_set(tmp_path / "slq", name="q2", query_set="query") == "q2"
    with pytest.raises(ValueError, match="default set; give it a name"):
        target.load_query_set(tmp_path / "slq")
    target.load_query_set(tmp_path / "slq", name="theirs")  # the folder's default set, under a new name
    assert target.query_sets == ["default", "document", "q2", "theirs"]
    got = target.encode(ITEMS, query_sets=["document", "q2", "theirs"])
    want = source.encode(ITEMS, query_sets=["document", "query", "default"])
    for mine, theirs in [("document", "document"), ("q2", "query"), ("theirs", "default")]:
        assert (got[mine] - want[theirs]).abs().max() <= TOL

    # Replacing the default set's values needs the same N_q.
    target.load_query_set(tmp_path / "slq", name="default", query_set="query")
    assert torch.equal(target.queries.detach(), source.get_query_set("query").detach())
    with pytest.raises(ValueError, match="cannot replace the default set"):
        target.load_query_set(tmp_path / "document.safetensors", name="default")


def test_width_mismatch_and_bad_files_are_refused(qwen, tmp_path):
    hidden = qwen.config.hidden_size
    save_file({"queries": torch.randn(4, hidden + 8)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=rf"{hidden + 8} wide .* hidden size {hidden}"):
        qwen.load_query_set(tmp_path / "wide.safetensors")
    save_file({"weights": torch.randn(4, hidden)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['queries'\]"):
        qwen.load_query_set(tmp_path / "other.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        qwen.load_query_set(tmp_path / "pickle.safetensors")
    save_file({"queries": torch.full((4, hidden), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        qwen.load_query_set(tmp_path / "nan.safetensors", name="x")
    with pytest.raises(OSError, match="query set 'missing'"):
        qwen.load_query_set(tmp_path, query_set="missing", name="x")
    # A path that is clearly local and missing fails at once (it is never tried as a Hub repo id).
    for missing in (tmp_path / "gone.safetensors", "gone.safetensors", "./gone", tmp_path / "gone"):
        with pytest.raises(OSError, match="no such file or folder on this machine"):
            qwen.load_query_set(missing, name="x")
    with pytest.raises(ValueError, match=rf"{hidden + 8} wide"):
        qwen.add_query_set("wide", queries=torch.randn(2, hidden + 8))
    assert qwen.query_sets == SETS


def test_set_from_another_backbone_type_of_the_same_width_warns(qwen, tmp_path, caplog):
    hidden = qwen.config.hidden_size
    save_file({"queries": torch.randn(4, hidden)}, str(tmp_path / "llava.safetensors"),
              metadata={"slq_query_set": "other", "backbone_model_type": "llava"})
    with caplog.at_level("WARNING"):
        assert qwen.load_query_set(tmp_path / "llava.safetensors") == "other"
    assert "trained on a 'llava' backbone" in caplog.text and "'qwen3_vl'" in caplog.text


def test_full_state_dict_round_trip_carries_the_sets(qwen, tiny_backbone_path):
    target = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    target.load_state_dict(qwen.state_dict())
    assert target.query_sets == SETS
    for name in SETS:
        assert torch.equal(target.get_query_set(name), qwen.get_query_set(name))


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_names_and_active_set(qwen):
    model = qwen
    assert model.query_sets == SETS and model.active_query_set == "default"
    with pytest.raises(ValueError, match="already exists"):
        model.add_query_set("query")
    with pytest.raises(ValueError, match="invalid"):
        model.add_query_set("bad name.with dots")
    with pytest.raises(KeyError, match=r"No query set named 'nope'.*\['default', 'query', 'document'\]"):
        model.set_active_query_set("nope")
    with pytest.raises(ValueError, match="cannot be removed"):
        model.remove_query_set("default")
    with pytest.raises(ValueError, match="names a set twice"):
        model.encode(ITEMS[:1], query_sets=["query", "query"])
    # New sets start from the backbone's embedding statistics, seeded by their name: distinct and reproducible.
    assert not torch.equal(model.get_query_set("query"), model.queries)
    twin = model.add_query_set("twin", num_queries=NUM_QUERIES)
    model.remove_query_set("twin")
    assert torch.equal(model.add_query_set("twin", num_queries=NUM_QUERIES), twin)
    with model.use_query_set("document"):
        assert model.active_query_set == "document" and model.active_queries.shape[0] == DOC_QUERIES
        inside = model.encode(ITEMS[:2])
    assert model.active_query_set == "default"
    assert (inside - model.encode(ITEMS[:2], query_sets=["document"])["document"]).abs().max() <= TOL
    assert model.query_set_for_task("query") == "query" and model.query_set_for_task("passage") is None
    assert model.max_query_set_size() == NUM_QUERIES


def test_a_use_query_set_block_is_not_saved_and_its_set_cannot_be_removed(models, tmp_path):
    """The block's set is the calling thread's temporary choice: a save inside it records the model-wide active set,
    and removing the block's own set is refused (the block would name a set that no longer exists)."""
    model = models("qwen3_vl")
    with model.use_query_set("document"):
        model.save_pretrained(tmp_path / "inside")
        with pytest.raises(ValueError, match="active set of the calling use_query_set block"):
            model.remove_query_set("document")
        assert model.active_query_set == "document" and "document" in model.query_sets
    model.set_active_query_set("document")  # also when the block's set is the model-wide one
    with model.use_query_set("document"), pytest.raises(ValueError, match="use_query_set block"):
        model.remove_query_set("document")
    model.set_active_query_set("default")
    assert json.loads((tmp_path / "inside" / "query_sets" / "sets.json").read_text())["active"] == "default"
    assert SLQModel.from_pretrained(tmp_path / "inside").active_query_set == "default"


# ----------------------------------------------------------------------------------------- sentence-transformers
def test_sentence_transformers_encode_query_and_document_use_their_sets(qwen, tiny_backbone_path, tmp_path):
    """Remote code only (slq_hf never imported in the subprocess): task -> forward -> the set of that name, falling
    back to the active set when the model has no such set."""
    pytest.importorskip("sentence_transformers")
    with_sets = tmp_path / "with_sets"
    qwen.save_pretrained(with_sets)
    plain = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    plain.add_query_set("passage")  # no "query"/"document" set: both tasks fall back to the active set
    plain.set_active_query_set("passage")
    plain.save_pretrained(tmp_path / "plain")
    texts, images = ["a red square", "what animal is this? describe the image."], [scene(64, 64, (255, 0, 0))]
    expected = {
        "with_sets": {**qwen.encode(texts, query_sets=SETS), "images": qwen.encode(images, query_sets=["document"])},
        "plain": {"passage": plain.encode(texts)},
    }
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from sentence_transformers import SentenceTransformer

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        image.paste((255, 0, 0), (16, 16, 48, 48))
        texts, expected = {texts!r}, torch.load({str(tmp_path / "expected.pt")!r})
        st = SentenceTransformer({str(with_sets)!r}, trust_remote_code=True, device="cpu")
        diff = lambda a, b: (torch.as_tensor(a) - b).abs().max().item()
        e = expected["with_sets"]
        print("DIFF query", diff(st.encode_query(texts), e["query"]))
        print("DIFF document", diff(st.encode_document(texts), e["document"]))
        print("DIFF document-image", diff(st.encode_document([image]), e["images"]["document"]))
        print("DIFF plain-encode", diff(st.encode(texts), e["default"]))
        st = SentenceTransformer({str(tmp_path / "plain")!r}, trust_remote_code=True, device="cpu")
        print("DIFF fallback-query", diff(st.encode_query(texts), expected["plain"]["passage"]))
        print("DIFF fallback-document", diff(st.encode_document(texts), expected["plain"]["passage"]))
        assert "slq_hf" not in sys.modules, "slq_hf was imported"
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("DIFF")}
    print(diffs)
    assert len(diffs) == 6 and all(v <= TOL for v in diffs.values()), diffs
    # And the sets really differ, so "query" vs "document" routing is what the comparison checks.
    assert (expected["with_sets"]["query"] - expected["with_sets"]["document"]).abs().max() > 0.05


# ------------------------------------------------------------------------------------------- embed + generate
def _chat(processor, text: str, image: Image.Image | None = None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")


def test_embed_and_generate_on_one_model_like_two_separate_models(tiny_backbone_path, tmp_path):
    path = tiny_backbone_path("qwen3_vl")
    backbone = AutoModelForImageTextToText.from_pretrained(path).eval()
    pointers = {name: p.data_ptr() for name, p in backbone.named_parameters()}
    shared = _with_sets(SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES,
                                               processor=AutoProcessor.from_pretrained(path)))
    # One copy of the weights: SLQ wraps the very same tensors and adds only its queries and temperature.
    assert {name: p.data_ptr() for name, p in shared.backbone.named_parameters()} == pointers
    own = sum(p.numel() for name, p in shared.named_parameters() if not name.startswith("backbone."))
    assert own == (2 * NUM_QUERIES + DOC_QUERIES) * shared.config.hidden_size + 1

    generator = AutoModelForImageTextToText.from_pretrained(path).eval()  # two separate models: one generates,
    embedder = SLQModel.from_backbone(path, num_queries=NUM_QUERIES)  # the other embeds with the same sets
    for name in SETS:
        embedder.load_query_set(shared.save_query_set(name, tmp_path / f"{name}.safetensors"), name=name)

    processor = shared.processor
    prompts = [_chat(processor, "describe the picture in one sentence", scene(64, 64, (255, 0, 0))),
               _chat(processor, "what animal is this?")]
    steps = [("generate", prompts[0]), ("encode", ITEMS), ("generate", prompts[1]), ("encode", ITEMS[:2]),
             ("generate", prompts[0])]
    for kind, payload in steps:
        if kind == "generate":
            mine = shared.backbone.generate(**payload, max_new_tokens=6, do_sample=False)
            ref = generator.generate(**payload, max_new_tokens=6, do_sample=False)
            assert mine.shape[1] > payload["input_ids"].shape[1] and torch.equal(mine, ref)
        else:
            mine = shared.encode(payload, query_sets=SETS)
            ref = embedder.encode(payload, query_sets=SETS)
            assert all((mine[n] - ref[n]).abs().max() <= 1e-6 for n in SETS)


def test_rag_example_runs(monkeypatch, capsys):
    """examples/rag_toy.py end to end (tiny random backbone when the toy one is absent): retrieve, then generate."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "rag_toy.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--size", "4", "--questions", "2", "--max-new-tokens", "3"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "model.backbone is the loaded backbone: True" in out and out.count("backbone answers:") == 2


def test_readme_query_sets_example_runs(tmp_path, monkeypatch):
    from helpers import run_readme_example

    run_readme_example("query-sets", tmp_path, monkeypatch)
    index = json.loads((tmp_path / "slq-multi" / "query_sets" / "sets.json").read_text())
    assert index["active"] == "query" and list(index["sets"]) == ["query", "document", "medical"]


# ---------------------------------------------------------------------------------------------- resume / best
def _joint_trainer(path: str, out, **overrides):
    from slq_hf.training import SLQTrainer

    torch.manual_seed(0)  # the same initial sets in every run
    model = _new(path, sharpen=False)
    model.joint_query_sets = ["query", "document"]
    settings = dict(learning_rate=1e-2, per_device_train_batch_size=2, max_steps=4, save_strategy="steps",
                    save_steps=1, remove_unused_columns=False, use_cpu=True, report_to="none", disable_tqdm=True,
                    seed=0)
    callbacks = overrides.pop("callbacks", None)
    compute_metrics = overrides.pop("compute_metrics", None)
    args = TrainingArguments(str(out), **{**settings, **overrides})
    # Eight distinct pairs: a batch holding one pair twice would give the queries no gradient.
    pairs = [{"image": scene(width, 64, rgb), "text": f"a {name} square {width} wide"}
             for width in (64, 96) for name, rgb in COLOURS]
    return model, SLQTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=PAIRS,
                             data_collator=SLQDataCollator(model.processor), callbacks=callbacks,
                             compute_metrics=compute_metrics)


def test_slq_trainer_resume_restores_every_query_set(tiny_backbone_path, tmp_path, caplog):
    from helpers import stop_at_step

    path = tiny_backbone_path("qwen3_vl")
    uninterrupted, trainer = _joint_trainer(path, tmp_path / "a")
    trainer.train()
    interrupted, trainer = _joint_trainer(path, tmp_path / "b", callbacks=[stop_at_step(2)])
    trainer.train()
    assert not torch.equal(interrupted.get_query_set("document"), uninterrupted.get_query_set("document"))
    resumed, trainer = _joint_trainer(path, tmp_path / "b")
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for name in SETS:
        assert torch.allclose(resumed.get_query_set(name), uninterrupted.get_query_set(name), rtol=0, atol=1e-6), name
    assert "keep their current values" not in caplog.text  # SLQTrainer restored them: no warning

    other, trainer = _joint_trainer(path, tmp_path / "b")
    other.add_query_set("extra")  # a set the run's checkpoints do not hold
    with pytest.raises(ValueError, match="has query set 'extra' but the checkpoint does not"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))


def test_slq_trainer_best_checkpoint_restores_every_query_set(tiny_backbone_path, tmp_path):
    scores = iter([3.0, 2.0, 1.0, 0.0])  # the first evaluation is the best: checkpoint-1, not the last step's

    path = tiny_backbone_path("qwen3_vl")
    model, trainer = _joint_trainer(path, tmp_path, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                                    metric_for_best_model="score", compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    for name in ("query", "document"):
        best = load_file(tmp_path / "checkpoint-1" / "query_sets" / f"{name}.safetensors")["queries"]
        last = load_file(tmp_path / "checkpoint-4" / "query_sets" / f"{name}.safetensors")["queries"]
        assert not torch.equal(best, last)
        assert torch.equal(model.get_query_set(name).detach(), best), name


def test_plain_load_state_dict_without_the_other_sets_warns(models, caplog):
    model = models("qwen3_vl")
    state = {"queries": model.queries.detach().clone(), "logit_scale": model.logit_scale.detach().clone()}
    with caplog.at_level("WARNING"):
        model.load_state_dict(state)
    assert "no entries for query sets ['query', 'document']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a state dict that carries every set: nothing to say
        model.load_state_dict({**state, **{f"latent_queries.{n}": model.get_query_set(n).detach().clone()
                                           for n in ("query", "document")}})
    assert "no entries" not in caplog.text


def test_load_state_dict_reads_pre_0_2_key_names(tiny_backbone_path, caplog):
    """State dicts of releases before 0.2 hold the default set as ``queries`` and the others as
    ``extra_query_sets.<name>``: they load into the same sets, and count as carrying them (no warning)."""
    model = _new(tiny_backbone_path("qwen3_vl"))  # its own: the shared models stay unchanged
    new = {n: torch.randn_like(model.get_query_set(n)) for n in model.query_sets}
    state = {"queries": new["default"], "logit_scale": model.logit_scale.detach().clone(),
             **{f"extra_query_sets.{n}": new[n] for n in model.query_sets[1:]}}
    with caplog.at_level("WARNING"):
        model.load_state_dict(state)
    assert "no entries" not in caplog.text
    for name, queries in new.items():
        assert torch.equal(model.get_query_set(name).detach(), queries), name


def test_a_model_cast_to_bfloat16_still_saves_float32_queries(tiny_backbone_path, tmp_path):
    model = _new(tiny_backbone_path("qwen3_vl")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "slq")
    header = {name: dtype for name, (dtype, _) in read_header(tmp_path / "slq" / "model.safetensors")[0].items()}
    assert set(header.values()) == {"F32"}, header
    sets = read_header(tmp_path / "slq" / "query_sets" / "query.safetensors")[0]
    assert {dtype for dtype, _ in sets.values()} == {"F32"}


def test_a_failed_load_state_dict_leaves_the_model_as_it_was(models):
    """Every entry is checked before any is copied: a bad default set, extra set or set name changes nothing."""
    model = models("qwen3_vl")
    before = {n: model.get_query_set(n).detach().clone() for n in model.query_sets}
    fresh = {f"latent_queries.{n}": torch.randn_like(q) for n, q in before.items()}
    for bad in ({"latent_queries.default": torch.zeros(1, 3)}, {"latent_queries.query": torch.zeros(2, 3)},
                {"latent_queries.query": torch.full_like(before["query"], float("nan"))},
                {"latent_queries.bad name": torch.zeros_like(before["query"])}):
        with pytest.raises(ValueError):
            model.load_state_dict({**fresh, "logit_scale": model.logit_scale.detach().clone(), **bad})
        assert model.query_sets == list(before)
        for name, queries in before.items():
            assert torch.equal(model.get_query_set(name).detach(), queries), (bad, name)
    # strict=False (torch's meaning): unknown keys are ignored and a missing logit_scale keeps its value
    scale = model.logit_scale.detach().clone()
    model.load_state_dict({"latent_queries.default": fresh["latent_queries.default"], "unknown": torch.zeros(1)},
                          strict=False)
    assert torch.equal(model.queries.detach(), fresh["latent_queries.default"])
    assert torch.equal(model.logit_scale.detach(), scale)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_state_dict({**fresh, "logit_scale": scale, "unknown": torch.zeros(1)})
    model.load_state_dict({"latent_queries.default": before["default"]}, strict=False)  # the shared model as it was


def test_save_query_set_into_a_folder_says_so(models, tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder; save_query_set writes one file, e.g. .*query\.safet"):
        models("qwen3_vl").save_query_set("query", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sets_json_num_queries_must_match_the_set_file(models, tmp_path):
    """The index's count is checked against the file's header (before the tensor is read), not ignored."""
    models("qwen3_vl").save_pretrained(tmp_path / "slq")
    index_file = tmp_path / "slq" / "query_sets" / "sets.json"
    index = json.loads(index_file.read_text())
    index["sets"]["query"]["num_queries"] = 99
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"query\.safetensors: tensor 'queries' has shape \(4, \d+\), expected \(99,"):
        SLQModel.from_pretrained(tmp_path / "slq")


def test_save_query_set_never_overwrites_a_file_that_is_not_a_query_set(models, tmp_path):
    """save_query_set onto an SLQ folder's model.safetensors or config.json used to replace them (a broken folder)."""
    model = models("qwen3_vl")
    model.save_pretrained(tmp_path / "slq")
    for name in ("model.safetensors", "config.json"):
        before = (tmp_path / "slq" / name).read_bytes()
        with pytest.raises(ValueError, match=rf"{name}: exists and is .*Nothing was written"):
            model.save_query_set("document", tmp_path / "slq" / name)
        assert (tmp_path / "slq" / name).read_bytes() == before
    # A query-set file (also one inside the folder) is replaced, as before.
    target = tmp_path / "slq" / "query_sets" / "query.safetensors"
    model.save_query_set("document", target)
    assert read_header(target)[0]["queries"][1] == (DOC_QUERIES, model.config.hidden_size)


def test_set_names_that_differ_only_in_case_are_refused(qwen):
    """"Query" and "query" are two files on Linux but one on macOS and Windows, where a same-sized set would then
    silently reload with the other's queries."""
    before = list(qwen.query_sets)
    for name in ("Query", "DOCUMENT", "Default"):
        with pytest.raises(ValueError, match="only in case"):
            qwen.add_query_set(name)
    assert qwen.query_sets == before



def test_a_set_with_more_queries_than_the_backbone_has_positions_is_refused_from_its_header(models, tmp_path):
    """The tiny backbones have 2048 positions, so at most 2047 queries fit after a prompt. A 3000-query set file (far
    under the 1 GiB cap) is refused from its header when the backbone is known: its NaN values are never read (a
    full read reported them)."""
    model = models("qwen3_vl")
    big = tmp_path / "big.safetensors"
    save_file({"queries": torch.full((3000, model.config.hidden_size), float("nan"))}, str(big))
    too_many = r"big\.safetensors: query set 'big' would have 3000 queries, but at most 2047 fit"
    with pytest.raises(ValueError, match=too_many):
        model.load_query_set(big, name="big")
    assert model.query_sets == SETS
    folder = tmp_path / "slq"
    model.save_pretrained(folder)
    os.replace(big, folder / "query_sets" / "big.safetensors")
    index = json.loads((folder / "query_sets" / "sets.json").read_text())
    for count in (None, 3000):  # sets.json without and with the count
        index["sets"]["big"] = {"file": "query_sets/big.safetensors", "num_queries": count}
        (folder / "query_sets" / "sets.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=too_many):  # a given backbone bounds the set from its header
            SLQModel.from_pretrained(folder, backbone=model.backbone)
    # The backbone the folder pins is loaded after the read (the 1 GiB cap bounds it meanwhile): a finite oversized
    # set is refused by name once the backbone's positions are known.
    save_file({"queries": torch.zeros(3000, model.config.hidden_size)}, str(folder / "query_sets" / "big.safetensors"))
    with pytest.raises(ValueError, match=r"'big' would have 3000 queries, but at most 2047 fit"):
        SLQModel.from_pretrained(folder)


def test_a_replaced_set_keeps_its_place_and_whether_it_trains(qwen, tmp_path):
    """load_query_set / load_state_dict with another N_q used to move the set to the end of query_sets (and so of
    sets.json). A frozen set stays frozen on the model; a save holds values only, so it reloads trainable."""
    model = qwen
    model.add_query_set("frozen", num_queries=2, trainable=False)
    model.add_query_set("last")
    order = [*SETS, "frozen", "last"]
    hidden = model.config.hidden_size
    five = torch.randn(5, hidden)
    save_file({"queries": five}, str(tmp_path / "five.safetensors"))
    model.load_query_set(tmp_path / "five.safetensors", name="query")
    model.load_query_set(tmp_path / "five.safetensors", name="frozen")
    six = torch.randn(6, hidden)
    model.load_state_dict({f"latent_queries.{n}": model.get_query_set(n).detach().clone() for n in order}
                          | {"latent_queries.document": six, "logit_scale": model.logit_scale.detach().clone()})
    assert model.query_sets == order
    query, frozen = model.get_query_set("query"), model.get_query_set("frozen")
    assert torch.equal(query.detach(), five) and query.requires_grad
    assert torch.equal(frozen.detach(), five) and not frozen.requires_grad
    assert torch.equal(model.get_query_set("document").detach(), six)

    model.save_pretrained(tmp_path / "slq")
    assert list(json.loads((tmp_path / "slq" / "query_sets" / "sets.json").read_text())["sets"]) == order[1:]
    reloaded = SLQModel.from_pretrained(tmp_path / "slq")
    assert reloaded.query_sets == order
    assert torch.equal(reloaded.get_query_set("frozen"), five) and reloaded.get_query_set("frozen").requires_grad


def test_an_outer_use_query_set_block_keeps_its_set(qwen):
    """Inside a nested block, remove_query_set used to accept the outer block's set: the outer block then named a set
    that no longer existed (KeyError at its next encode)."""
    model = qwen
    with model.use_query_set("document"):
        with model.use_query_set("query"), pytest.raises(ValueError, match="block or of one around it"):
            model.remove_query_set("document")
        assert model.active_query_set == "document" and "document" in model.query_sets
        assert model.encode(ITEMS[:1]).shape == (1, model.config.embedding_dim)
    assert model.active_query_set == "default"
    model.remove_query_set("document")  # after the blocks
    assert model.query_sets == ["default", "query"]
