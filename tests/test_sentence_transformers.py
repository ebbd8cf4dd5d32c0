"""sentence-transformers 6.x on SLQ folders: every folder SLQModel.save_pretrained writes loads with
``SentenceTransformer(folder, trust_remote_code=True)`` and embeds exactly like ``SLQModel.encode``.

Two backbone families (Qwen3-VL: M-RoPE, variable image grids; LLaVA: 1-D RoPE, a CLIP tower whose hidden states
transformers records through hooks). Covered: the files, every input kind, batch sizes, query/document prompts and
``task``, truncate_dim, the InformationRetrievalEvaluator, the multi-process pool, SentenceTransformerTrainer with
(Cached)MultipleNegativesRankingLoss, 4-bit, and the optional-import guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slq_hf import SLQModel
from slq_hf.modeling import sentence_transformers_files as st_files

from helpers import run_readme_example, scene

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

NUM_QUERIES = 4
FAMILIES = ["qwen3_vl", "llava"]
TOL = 1e-5
COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0)}


# Different sizes on purpose (they must batch together). Kept at most twice the tiny processors' resolution, where
# SLQModel.encode hands images to the processor unshrunk, as sentence-transformers always does.
IMAGES = [scene(48, 48, COLOURS["red"]), scene(56, 40, COLOURS["blue"]), scene(32, 56, COLOURS["green"])]
TEXTS = ["a red square on grey", "an animal with nine lives", "hello"]


@pytest.fixture(scope="module")
def slq(tiny_backbone_path, tmp_path_factory):
    """family -> (SLQModel with non-trivial queries, its saved folder, a SentenceTransformer loaded from it)."""
    cache: dict[str, tuple[SLQModel, Path, SentenceTransformer]] = {}

    def get(family: str):
        if family not in cache:
            model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES)
            with torch.no_grad():  # distinct queries, so a mix-up between models or rows shows
                model.queries.copy_(torch.randn(model.queries.shape, generator=torch.Generator().manual_seed(1)))
            folder = tmp_path_factory.mktemp(f"slq_{family}") / "model"
            model.save_pretrained(folder)
            cache[family] = model, folder, SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
        return cache[family]

    return get


def _tensor(embeddings) -> torch.Tensor:
    return torch.as_tensor(embeddings, dtype=torch.float32)


def _max_diff(a, b) -> float:
    return (_tensor(a) - _tensor(b)).abs().max().item()


# ------------------------------------------------------------------------------------------------------- files
def test_save_pretrained_writes_a_sentence_transformers_folder(slq):
    _, folder, _ = slq("qwen3_vl")
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["path"], m["type"]) for m in modules] == [
        ("", "sentence_transformers.base.modules.transformer.Transformer"),
        ("1_Normalize", "sentence_transformers.base.modules.normalize.Normalize"),
    ]
    assert modules[0]["kwargs"] == ["task"]
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    assert set(config["modality_config"]) == {"text", "image", "image+text", "message"}
    assert all(entry["method"] == "forward" and entry["method_output_name"] == "pooler_output"
               for entry in config["modality_config"].values())
    assert config["modality_config"]["message"]["format"] == "structured"
    assert config["module_output_name"] == "sentence_embedding" and config["unpad_inputs"] is False
    assert config["processing_kwargs"] == {"chat_template": {"add_generation_prompt": True}}
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "", "document": ""} and st_config["similarity_fn_name"] == "cosine"
    normalize = json.loads((folder / "1_Normalize" / "config.json").read_text())
    assert normalize["module_input_name"] == "sentence_embedding"
    # Still a queries-only folder.
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"queries", "logit_scale"}


def test_rewriting_keeps_user_settings_and_enforces_slq_keys(tmp_path):
    # What sentence-transformers leaves behind before it asks SLQModel to save itself: its own prompts, an extra
    # module, a processing setting; and a broken file that must simply be replaced.
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "Find: ", "document": ""}, "similarity_fn_name": "dot"}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": st_files.TRANSFORMER_TYPE},
               {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps(
        {"processing_kwargs": {"text": {"max_length": 64}}, "module_output_name": "token_embeddings"}))
    st_files.write_sentence_transformers_files(tmp_path)

    st_config = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "Find: ", "document": ""} and st_config["similarity_fn_name"] == "dot"
    assert "sentence_transformers" in st_config["requirements"]
    written = json.loads((tmp_path / "modules.json").read_text())
    assert [m["path"] for m in written] == ["", "1_Dense"] and written[0]["kwargs"] == ["task"]
    config = json.loads((tmp_path / "sentence_bert_config.json").read_text())
    assert config["processing_kwargs"] == {"text": {"max_length": 64}}
    assert config["module_output_name"] == "sentence_embedding" and config["unpad_inputs"] is False

    (tmp_path / "modules.json").write_text("{not json")
    st_files.write_sentence_transformers_files(tmp_path, prompts={"query": "Q: ", "document": "D: "})
    assert json.loads((tmp_path / "modules.json").read_text()) == st_files.modules_config()
    prompts = json.loads((tmp_path / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "Q: ", "document": "D: "}


# ------------------------------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("family", FAMILIES)
def test_every_input_kind_matches_slq_encode_at_every_batch_size(slq, family, tmp_path):
    model, _, st = slq(family)
    path = tmp_path / "photo.png"
    IMAGES[1].save(path)
    dict_input = {"image": IMAGES[0], "text": "what shape is this?"}
    inputs = [*TEXTS, *IMAGES, str(path), dict_input]
    expected = model.encode(inputs, batch_size=2)
    for batch_size in (1, 3, len(inputs)):  # one item per batch, mixed batches, everything (all image sizes) at once
        got = st.encode(inputs, batch_size=batch_size, convert_to_tensor=True)
        assert got.shape == expected.shape
        assert _max_diff(got, expected) <= TOL, batch_size

    # Chat messages: the same user turn written by hand (image first, then text, as SLQ builds it).
    message = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]},
                                            {"type": "text", "text": "what shape is this?"}]}]
    assert _max_diff(st.encode([message]), expected[-1:]) <= TOL
    assert _max_diff(st.encode(message), expected[-1]) <= TOL  # one conversation = one input
    # Images of different sizes in one batch agree with each alone.
    assert _max_diff(st.encode(IMAGES, batch_size=len(IMAGES)), st.encode(IMAGES, batch_size=1)) <= TOL


def test_bad_input_error_names_its_position_in_any_batch_type(slq):
    """sentence-transformers embeds a tuple, a datasets Column or a string array as a batch; an error must name the
    bad input's position in it, not call the batch itself "Nested tuple (input 0)" / "Unsupported input type"."""
    import numpy as np
    from datasets import Dataset

    from slq_hf.integrations.sentence_transformers import load_sentence_transformer
    from slq_hf.processing import SLQInputError

    _, folder, _ = slq("qwen3_vl")
    st = load_sentence_transformer(folder, device="cpu")
    texts = ["hello", "a cat", "   "]
    batches = {"tuple": tuple(texts), "Column": Dataset.from_dict({"text": texts})["text"],
               "ndarray": np.array(texts, dtype=object)}
    for kind, batch in batches.items():
        with pytest.raises(SLQInputError, match=r"empty or whitespace only \(input 2\)"):
            st.encode(batch)
        assert st.encode(batch[:2]).shape == (2, st[0].model.config.embedding_dim), kind


@pytest.mark.filterwarnings("ignore:Image of .* is above the model's image budget")
def test_image_budget_given_at_load_time_reaches_preprocessing(slq):
    """``model_kwargs={"max_image_tokens": ...}`` budgets SLQModel's processor; the Transformer module preprocesses
    with its own processor from the folder's files, which must get the same budget (it silently kept the folder's)."""
    from slq_hf.integrations.sentence_transformers import load_sentence_transformer

    _, folder, _ = slq("qwen3_vl")
    photo = [scene(200, 160, COLOURS["red"])]  # above a 4-token budget
    budgeted = SLQModel.from_pretrained(folder, max_image_tokens=4).encode(photo)
    assert _max_diff(budgeted, SLQModel.from_pretrained(folder).encode(photo)) > 1e-3  # the budget matters here
    st = load_sentence_transformer(folder, device="cpu", model_kwargs={"max_image_tokens": 4})
    assert _max_diff(st.encode(photo), budgeted) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_query_and_document_prompts_reach_forward_as_task(slq, family, monkeypatch):
    model, folder, st = slq(family)
    seen: list[str | None] = []
    forward = st[0].model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("task"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(st[0].model, "forward", spy)
    plain = st.encode(TEXTS[:2])
    query = st.encode_query(TEXTS[:2])
    document = st.encode_document([IMAGES[0]])
    assert seen == [None, "query", "document"]
    # The default prompts are empty (the paper uses no instruction): the same embeddings as encode / SLQModel.encode.
    assert _max_diff(query, plain) <= TOL and _max_diff(document, model.encode([IMAGES[0]])) <= TOL


def test_custom_prompt_is_a_system_turn_and_survives_saving(slq, tmp_path):
    model, folder, _ = slq("qwen3_vl")
    prompt = "Find the picture that matches:"
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu",
                             prompts={"query": prompt, "document": ""})
    got = st.encode_query(TEXTS[:1])
    conversation = [{"role": "system", "content": [{"type": "text", "text": prompt}]},
                    {"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}]
    batch = model.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt",
                                                processor_kwargs={"padding": True})
    with torch.no_grad():
        expected = model(**batch).pooler_output
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(got, model.encode(TEXTS[:1])) > 1e-3  # the prompt really changed the input

    # sentence-transformers writes its config (with the prompt) before SLQModel.save_pretrained rewrites the files.
    st.save_pretrained(str(tmp_path / "saved"))
    reloaded = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    assert reloaded.prompts["query"] == prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_dim(slq, family):
    # SLQ queries are not trained Matryoshka-style: truncation works mechanically, its retrieval quality is untested.
    _, folder, st = slq(family)
    inputs = [*TEXTS, *IMAGES]
    full = st.encode(inputs)
    assert _max_diff(st.encode(inputs, truncate_dim=16), full[:, :16]) == 0
    short = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=16)
    assert short.encode(inputs).shape == (len(inputs), 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_information_retrieval_evaluator_text_to_image(slq, family):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    model, _, st = slq(family)
    corpus = {f"img{i}": scene(40 + 8 * i, 40, rgb) for i, rgb in enumerate(COLOURS.values())}
    queries = {f"q{i}": f"a {name} square on grey" for i, name in enumerate(COLOURS)}
    relevant = {f"q{i}": {f"img{i}"} for i in range(len(COLOURS))}
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, name="t2i", batch_size=4,
                                              accuracy_at_k=[1, 4], precision_recall_at_k=[1], mrr_at_k=[4],
                                              ndcg_at_k=[4], map_at_k=[4], show_progress_bar=False)
    results = evaluator(st)
    # Recompute R@1 from SLQModel's own embeddings: the evaluator ranked what SLQ embeds.
    similarity = model.encode(list(queries.values())) @ model.encode(list(corpus.values())).T
    recall_at_1 = (similarity.argmax(dim=1) == torch.arange(len(queries))).float().mean().item()
    assert results["t2i_cosine_accuracy@1"] == pytest.approx(recall_at_1)
    assert results["t2i_cosine_accuracy@4"] == 1.0  # every image is among the 4 of 4
    assert all(0.0 <= value <= 1.0 for value in results.values())


# ---------------------------------------------------------------------------------------- remote code, processes
def test_plain_sentence_transformers_remote_code_and_multi_process_pool(slq, tmp_path):
    """A fresh interpreter that never imports slq_hf: the folder's own code loads it, and the two-worker CPU pool
    (started after a forward, when transformers has hooked LLaVA's vision tower) matches one process."""
    model, folder, _ = slq("llava")
    inputs = [*TEXTS, *IMAGES]
    torch.save(model.encode(inputs), tmp_path / "expected.pt")
    script = tmp_path / "run_pool.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import torch
        from PIL import Image
        from sentence_transformers import SentenceTransformer

        def scene(width, height, colour):
            image = Image.new("RGB", (width, height), (128, 128, 128))
            image.paste(colour, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
            return image

        if __name__ == "__main__":
            torch.set_num_threads(1)
            inputs = {TEXTS!r} + [scene(48, 48, {COLOURS['red']}), scene(56, 40, {COLOURS['blue']}),
                                  scene(32, 56, {COLOURS['green']})]
            st = SentenceTransformer({str(folder)!r}, trust_remote_code=True, device="cpu")
            single = st.encode(inputs, convert_to_tensor=True)
            pool = st.start_multi_process_pool(["cpu", "cpu"])
            try:
                multi = st.encode(inputs, pool=pool, chunk_size=3, convert_to_tensor=True)
            finally:
                st.stop_multi_process_pool(pool)
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            print("MODULE", type(st[0].model).__module__)
            print("DIFF single", (single - expected).abs().max().item())
            print("DIFF multi", (multi - single).abs().max().item())
            print("SLQ_HF_IMPORTED", "slq_hf" in sys.modules)
    """))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert lines["MODULE"].startswith("transformers_modules."), lines
    assert lines["SLQ_HF_IMPORTED"] == "False"
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("DIFF")}
    assert diffs.keys() == {"single", "multi"} and all(value <= TOL for value in diffs.values()), diffs


def _capture_hooked(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if any(getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
                   for hook in module._forward_hooks.values())]


def test_pickled_model_drops_capture_hooks_and_still_records(slq):
    """What the pool relies on, in-process: after a forward the LLaVA model pickles, and the copy still works."""
    import pickle

    model, _, _ = slq("llava")
    model.encode(IMAGES[:1])  # transformers hooks the vision tower on first use
    hooked = _capture_hooked(model)
    assert hooked, "the tiny LLaVA no longer records hidden states through hooks; this test lost its subject"
    copy = pickle.loads(pickle.dumps(model))
    assert _capture_hooked(copy) == []
    assert _max_diff(copy.encode(IMAGES), model.encode(IMAGES)) <= TOL  # the copy records hidden states again
    assert _capture_hooked(model) == hooked  # the original is untouched


def test_model_sharing_its_backbone_pickles_for_the_pool(tiny_backbone_path, tmp_path):
    """``to_sentence_transformer`` shares the backbone with the SLQModel it wraps. The multi-process pool pickles the
    SentenceTransformer: the copy must come back and embed like the original. (When each model's query hook held its
    model, the shared embedding layer dragged the other model into the pickle and unpickling raised AttributeError
    "... object has no attribute '_modules'".)"""
    import pickle

    from slq_hf.integrations.sentence_transformers import to_sentence_transformer

    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)
    st = to_sentence_transformer(model, tmp_path / "st")
    with torch.no_grad():
        st[0].model.queries.mul_(2)  # the two models now embed differently
    copy = pickle.loads(pickle.dumps(st))
    inputs = [TEXTS[0], IMAGES[0]]
    assert _max_diff(copy.encode(inputs), st.encode(inputs)) <= TOL


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize(("family", "loss_name"), [("qwen3_vl", "mnrl"), ("qwen3_vl", "cached_mnrl"),
                                                   ("llava", "mnrl"), ("llava", "cached_mnrl")])
def test_sentence_transformer_trainer_updates_only_the_queries(tiny_backbone_path, family, loss_name, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from slq_hf.integrations.sentence_transformers import to_sentence_transformer

    slq_model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES)
    st = to_sentence_transformer(slq_model, tmp_path / "start")
    inner = st[0].model
    assert inner.backbone is slq_model.backbone  # shared, not a second copy
    names = list(COLOURS)
    dataset = Dataset.from_dict({"anchor": [f"a {name} square on grey" for name in names],
                                 "positive": [scene(32 + 8 * i, 40, COLOURS[n]) for i, n in enumerate(names)]})
    queries_before = inner.queries.detach().clone()
    logit_scale_before = inner.logit_scale.detach().clone()
    backbone_before = {k: v.detach().clone() for k, v in inner.backbone.state_dict().items()}

    loss = (MultipleNegativesRankingLoss(st) if loss_name == "mnrl"
            else CachedMultipleNegativesRankingLoss(st, mini_batch_size=2))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss).train()

    assert (inner.queries.detach() - queries_before).abs().max() > 0
    # sentence-transformers' losses bring their own scale: SLQ's temperature is not used, so it must not move.
    assert torch.equal(inner.logit_scale.detach(), logit_scale_before)
    assert not any(p.requires_grad for p in inner.backbone.parameters())
    after = inner.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())

    out = tmp_path / "trained"
    st.save_pretrained(str(out))
    weights = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]  # queries only: no backbone weights written
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"queries", "logit_scale"}
        torch.testing.assert_close(handle.get_tensor("queries"), inner.queries.detach().float())
    reloaded = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    inputs = [dataset[0]["anchor"], dataset[0]["positive"]]
    assert _max_diff(reloaded.encode(inputs), st.encode(inputs)) <= TOL


# --------------------------------------------------------------------------------------------------------- 4-bit
@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_through_model_kwargs(slq, family):
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    def quantization():
        # bitsandbytes' CPU 4-bit kernel needs in_features >= 64; the tiny vision towers are 32 wide, so they stay
        # unquantised (real backbones are far wider). The language model is NF4.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=["model.visual", "model.vision_tower",
                                                         "model.multi_modal_projector", "lm_head"])

    _, folder, _ = slq(family)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu",
                             model_kwargs={"quantization_config": quantization()})
    assert any(isinstance(m, Linear4bit) for m in st[0].model.backbone.modules())
    assert st[0].model.queries.dtype == torch.float32
    reference = SLQModel.from_pretrained(folder, quantization_config=quantization())
    inputs = [*TEXTS[:2], *IMAGES[:2]]
    assert _max_diff(st.encode(inputs), reference.encode(inputs)) <= TOL


# ------------------------------------------------------------------------------------------------------- README
def test_readme_sentence_transformers_example_runs(tmp_path, monkeypatch):
    run_readme_example("sentence-transformers", tmp_path, monkeypatch)
    with safe_open(str(tmp_path / "slq-tiny-trained" / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"queries", "logit_scale"}
    assert (tmp_path / "slq-tiny-trained" / "modules.json").is_file()


# ----------------------------------------------------------------------------------------------- optional import
def test_helpers_explain_a_missing_sentence_transformers(slq, monkeypatch):
    from slq_hf.integrations import sentence_transformers as helpers

    assert helpers.is_sentence_transformers_available()
    model, folder, _ = slq("qwen3_vl")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    assert not helpers.is_sentence_transformers_available()
    with pytest.raises(ImportError, match=r"pip install 'slq_hf\[sentence-transformers\]'"):
        helpers.load_sentence_transformer(folder)
    with pytest.raises(ImportError, match="sentence-transformers"):
        helpers.to_sentence_transformer(model)


def test_embedding_dimension_and_model_card(slq, tiny_backbone_path, tmp_path):
    """sentence-transformers reads ``config.projection_dim`` first: it must be the embedding width, with or without
    a head, and saving writes its model card (which asks for the dimension) without an error."""
    model, _, st = slq("qwen3_vl")
    assert st.get_embedding_dimension() == model.config.hidden_size == st.encode(TEXTS[:1]).shape[1]
    st.save(str(tmp_path / "st"))
    assert "sentence-transformers" in (tmp_path / "st" / "README.md").read_text()
    head = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, projection_dim=16)
    head.save_pretrained(tmp_path / "head")
    assert json.loads((tmp_path / "head" / "config.json").read_text())["projection_size"] == 16
    st_head = SentenceTransformer(str(tmp_path / "head"), trust_remote_code=True, device="cpu")
    assert st_head.get_embedding_dimension() == 16 == st_head.encode(TEXTS[:1]).shape[1]
