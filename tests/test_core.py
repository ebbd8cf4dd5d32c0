"""Core SLQModel behaviour on the tiny Qwen3-VL: the paper's reference procedure, config validation, queries-only
checkpoints, AutoModel loading (registered and remote code) and load-time checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import slq_hf
import slq_hf.processing
from slq_hf import SLQConfig, SLQModel

from helpers import scene

NUM_QUERIES = 4


INPUTS = [
    "a red square on grey",
    scene(64, 64, (255, 0, 0)),
    {"image": scene(96, 64, (0, 0, 255)), "text": "what shape is this?"},
    "hello",
]


@pytest.fixture
def model(tiny_backbone_path):
    return SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)


# ------------------------------------------------------------------------------------------------ reference
def _reference_qwen3_vl(model: SLQModel, batch) -> torch.Tensor:
    """The paper's procedure written out by hand for ONE unpadded prompt on Qwen3-VL.

    embed ids extended with placeholder ids -> queries at the last N_q rows -> scatter image features ->
    DeepStack -> 3-D rope index on the extended ids -> language model -> mean of the last N_q states -> L2 norm.
    """
    core = model.backbone.model
    ids = batch["input_ids"]  # (1, L)
    num_queries = model.config.num_queries
    ext = torch.cat([ids, torch.full((1, num_queries), model.config.placeholder_token_id)], dim=1)  # (1, L+N_q)
    mask = torch.ones_like(ext)
    embeds = core.language_model.embed_tokens(ext).clone()  # (1, L+N_q, H)
    embeds[0, -num_queries:] = model.queries.to(embeds.dtype)
    visual_mask, deepstack = None, None
    if "pixel_values" in batch:
        features = core.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        image_embeds = torch.cat(features.pooler_output, dim=0)
        visual_mask = ext == model.backbone.config.image_token_id  # (1, L+N_q)
        embeds[visual_mask] = image_embeds.to(embeds.dtype)
        deepstack = [torch.cat(f, dim=0) for f in features.deepstack_features]
    mm_types = torch.cat([batch["mm_token_type_ids"], torch.zeros((1, num_queries), dtype=torch.long)], dim=1)
    positions, _ = core.get_rope_index(ext, mm_types, batch.get("image_grid_thw"), None, attention_mask=mask)
    out = core.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                              visual_pos_masks=visual_mask, deepstack_visual_embeds=deepstack)
    pooled = out.last_hidden_state[:, -num_queries:].float().mean(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_hand_written_reference_qwen3_vl(tiny_backbone_path, attn):
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, attn_implementation=attn)
    with torch.no_grad():
        torch.nn.init.normal_(model.queries, std=0.5)  # distinct queries so a wrong order/placement shows
        batched = model.encode(INPUTS, batch_size=len(INPUTS))
        for index, value in enumerate(INPUTS):
            item = slq_hf.processing.to_item(value, index)
            batch = slq_hf.processing.collate(model.processor, [item])
            reference = _reference_qwen3_vl(model, batch)
            torch.testing.assert_close(batched[index : index + 1], reference, atol=1e-5, rtol=0)


def test_reference_detects_misplaced_queries(model):
    """The reference comparison can fail: shifting the queries one slot earlier changes the embedding."""
    item = slq_hf.processing.to_item(INPUTS[1])
    batch = slq_hf.processing.collate(model.processor, [item])
    with torch.no_grad():
        torch.nn.init.normal_(model.queries, std=0.5)
        good = model(**batch).pooler_output
        shifted = model.queries.roll(1, dims=0).clone()
        model.queries.copy_(shifted)
        bad = model(**batch).pooler_output
    assert (good - bad).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_queries": 0}, "`num_queries`=0"),
        ({"num_queries": 2.5}, "`num_queries`=2.5"),
        ({"pooling": "max"}, "`pooling`='max'"),
        ({"query_init": "zeros"}, "`query_init`='zeros'"),
        ({"temperature": 0}, "`temperature`=0"),
        ({"temperature": 5.0}, "`temperature`=5.0"),
        ({"projection_dim": 0}, "`projection_dim`=0"),
        ({"normalize": "yes"}, "`normalize`='yes'"),
        ({"training_path": "fast"}, "`training_path`='fast'"),
    ],
)
def test_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        SLQConfig(**kwargs)
    assert fragment in str(err.value)


def test_config_defaults_follow_the_paper():
    config = SLQConfig()
    assert (config.num_queries, config.pooling, config.normalize, config.temperature) == (40, "mean", True, 0.07)
    assert config.projection_size is None and config.query_init == "normal"


def test_from_backbone_freezes_backbone_and_sets_hidden_size(model):
    assert all(not p.requires_grad for p in model.backbone.parameters())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["latent_queries.default", "logit_scale"]
    hidden = model.backbone.get_input_embeddings().weight.shape[1]
    assert model.config.hidden_size == hidden and model.queries.shape == (NUM_QUERIES, hidden)
    assert model.queries.dtype == torch.float32
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))


@pytest.mark.parametrize("query_init", ["normal", "vocab"])
def test_query_init_matches_embedding_scale(tiny_backbone_path, query_init):
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=32, query_init=query_init)
    weight = model.backbone.get_input_embeddings().weight.float()
    ratio = model.queries.std() / weight.std()
    assert 0.7 < ratio < 1.3
    if query_init == "vocab":  # every query is an actual row of the embedding matrix
        exact = "donot_use_mm_for_euclid_dist"  # the mm shortcut loses ~1e-4 to cancellation
        distances = torch.cdist(model.queries.detach(), weight, compute_mode=exact).min(dim=1).values
        assert distances.max() < 1e-6


def test_projection_head_shrinks_embedding(tiny_backbone_path, tmp_path):
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, projection_dim=16)
    emb = model.encode(INPUTS[:2])
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    model.save_pretrained(tmp_path / "slq")
    assert sorted(load_file(tmp_path / "slq" / "model.safetensors")) == [
        "logit_scale", "projection.bias", "projection.weight", "queries"]
    reloaded = AutoModel.from_pretrained(tmp_path / "slq")
    torch.testing.assert_close(reloaded.encode(INPUTS[:2]), emb, atol=1e-6, rtol=0)


def test_a_model_cast_to_bfloat16_with_a_head_still_encodes(tiny_backbone_path):
    """A bf16 head (``model.to`` keeps it float32, a cast of the head itself does not) gets pooled states in its own
    dtype (it raised "mat1 and mat2 must have the same dtype"). The output stays float32, near the float32 model's."""
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, projection_dim=16)
    full = model.encode(INPUTS[:2])
    model.to(torch.bfloat16).projection.to(torch.bfloat16)
    half = model.encode(INPUTS[:2])
    assert half.dtype == torch.float32 and half.shape == (2, 16)
    assert (half - full).abs().max() < 0.1 and torch.isfinite(half).all()

def test_a_head_too_large_to_save_is_refused_before_allocating(tiny_backbone_path, model, tmp_path, capsys):
    """A projection head over the 1 GiB an SLQ checkpoint may hold is refused from the config, before its weight is
    allocated (one row over the limit too); through the CLI it was a RuntimeError traceback from the allocation."""
    from PIL import Image

    from slq_hf.cli import main

    hidden = model.config.hidden_size
    with pytest.raises(ValueError, match=rf"projection_size={2**30 // hidden} makes a 4096 MiB head on this "
                                         rf"{hidden}-wide backbone, more than the 1024 MiB"):
        SLQModel.from_backbone(model.backbone, num_queries=NUM_QUERIES, projection_dim=2**30 // hidden)
    with pytest.raises(ValueError, match="more than the 1024 MiB"):
        SLQModel.from_backbone(model.backbone, num_queries=NUM_QUERIES, projection_dim=2**28 // hidden + 1)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "red.png", "text": "a red square"}) + "\n")
    assert main(["train", "--backbone", tiny_backbone_path("qwen3_vl"), "--train-data", str(tmp_path / "pairs.jsonl"),
                 "--output-dir", str(tmp_path / "run"), "--projection-dim", "100000000", "--use-cpu"]) == 2
    err = capsys.readouterr().err
    assert "projection_size=100000000 makes a" in err and "Traceback" not in err


def test_last_pooling_uses_last_query_only(tiny_backbone_path):
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, pooling="last")
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    with torch.no_grad():
        out = model(**batch)
    expected = torch.nn.functional.normalize(out.query_states[:, -1].float(), dim=-1)
    torch.testing.assert_close(out.pooler_output, expected)


# ------------------------------------------------------------------------------------------------ save / load
def test_saved_folder_is_queries_only(model, tmp_path, tiny_backbone_path):
    out = tmp_path / "slq"
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    backbone_files = {p.name for p in Path(tiny_backbone_path("qwen3_vl")).iterdir() if p.suffix == ".safetensors"}
    assert backbone_files and not backbone_files - {"model.safetensors"} & names
    state = load_file(out / "model.safetensors")
    assert sorted(state) == ["logit_scale", "queries"]
    hidden = model.config.hidden_size
    size = (out / "model.safetensors").stat().st_size
    assert 4 * NUM_QUERIES * hidden <= size <= 4 * NUM_QUERIES * hidden + 1024  # tensor bytes + a small header
    assert {"configuration_slq.py", "modeling_slq.py", "config.json"} <= names
    assert any(name.startswith(("tokenizer", "processor", "preprocessor")) for name in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slq" and config["auto_map"]["AutoModel"] == "modeling_slq.SLQModel"
    assert config["backbone_name_or_path"] == tiny_backbone_path("qwen3_vl")
    # No backbone tensor names leak into the checkpoint.
    assert not any(key.startswith("backbone") for key in state)


def test_automodel_roundtrip_after_import(model, tmp_path):
    with torch.no_grad():
        torch.nn.init.normal_(model.queries, std=0.3)
        model.logit_scale.fill_(3.0)
    expected = model.encode(INPUTS)
    model.save_pretrained(tmp_path / "slq")
    reloaded = AutoModel.from_pretrained(tmp_path / "slq")
    assert isinstance(reloaded, SLQModel) and not reloaded.training
    torch.testing.assert_close(reloaded.queries, model.queries)
    assert reloaded.logit_scale.item() == pytest.approx(3.0)
    torch.testing.assert_close(reloaded.encode(INPUTS), expected, atol=1e-6, rtol=0)


def test_remote_code_in_fresh_interpreter(model, tmp_path):
    """trust_remote_code loads the copied modeling files; slq_hf is never imported in that process."""
    out = tmp_path / "slq"
    model.save_pretrained(out)
    expected = model.encode(INPUTS[:2])
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert "slq_hf" not in sys.modules, "slq_hf was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        image.paste((255, 0, 0), (16, 16, 48, 48))
        got = model.encode(["a red square on grey", image])
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        diff = (got - expected).abs().max().item()
        assert diff < 1e-6, diff
        print("OK", diff)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_backbone_override_and_missing_backbone(model, tmp_path, tiny_backbone_path):
    out = tmp_path / "slq"
    model.save_pretrained(out)
    mirror = tmp_path / "mirror"
    model.backbone.save_pretrained(mirror)
    config = json.loads((out / "config.json").read_text())
    config["backbone_name_or_path"] = str(tmp_path / "does-not-exist")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError):
        AutoModel.from_pretrained(out)
    reloaded = AutoModel.from_pretrained(out, backbone_name_or_path=str(mirror))
    assert reloaded.config.backbone_name_or_path == str(mirror)
    torch.testing.assert_close(reloaded.encode(INPUTS[:1]), model.encode(INPUTS[:1]), atol=1e-6, rtol=0)


def test_query_width_mismatch_names_both(model, tmp_path):
    out = tmp_path / "slq"
    model.save_pretrained(out)
    hidden = model.config.hidden_size
    save_file({"queries": torch.zeros(NUM_QUERIES, hidden * 2), "logit_scale": torch.tensor(2.0)},
              str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] = None
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        AutoModel.from_pretrained(out)
    assert str(hidden * 2) in str(err.value) and str(hidden) in str(err.value)


def test_config_hidden_size_mismatch_names_both(model, tmp_path):
    out = tmp_path / "slq"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] = 999
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        AutoModel.from_pretrained(out)
    assert "999" in str(err.value) and str(model.config.hidden_size) in str(err.value)


def test_pickle_checkpoint_is_refused(model, tmp_path):
    out = tmp_path / "slq"
    model.save_pretrained(out)
    (out / "model.safetensors").unlink()
    torch.save({"queries": model.queries.detach()}, out / "pytorch_model.bin")
    with pytest.raises(OSError) as err:
        AutoModel.from_pretrained(out)
    assert "pickle" in str(err.value) and "pytorch_model.bin" in str(err.value)


def test_unsupported_backbone_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    backbone = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError) as err:
        SLQModel.from_backbone(backbone, num_queries=2)
    assert "gpt2" in str(err.value) and "qwen3_vl" in str(err.value) and "llava" in str(err.value)


def test_loaded_backbone_object_is_reused(tiny_backbone_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_backbone_path("qwen3_vl")
    backbone = AutoModelForImageTextToText.from_pretrained(path)
    model = SLQModel.from_backbone(backbone, num_queries=2, processor=AutoProcessor.from_pretrained(path))
    assert model.backbone is backbone
    assert model.encode(["x"]).shape == (1, model.config.hidden_size)
    with pytest.raises(ValueError, match="already loaded"):
        SLQModel.from_backbone(backbone, num_queries=2, dtype=torch.bfloat16)


def test_encode_returns_input_order_and_empty(model):
    emb = model.encode(INPUTS, batch_size=3)
    singles = torch.cat([model.encode([x]) for x in INPUTS])
    torch.testing.assert_close(emb, singles, atol=1e-5, rtol=0)
    assert model.encode([]).shape == (0, model.config.hidden_size)
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(INPUTS, batch_size=0)


def test_bf16_backbone_keeps_fp32_queries(tiny_backbone_path):
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, dtype=torch.bfloat16)
    assert model.backbone.dtype == torch.bfloat16 and model.queries.dtype == torch.float32
    emb = model.encode(INPUTS[:2])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    emb.sum()  # encode runs under inference mode: no graph is kept
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    model(**batch).pooler_output.sum().backward()
    assert model.queries.grad is not None and model.queries.grad.dtype == torch.float32


@pytest.mark.parametrize("cast", ["to_bfloat16", "half"])
def test_casting_the_model_keeps_its_trainable_tensors_float32(tiny_backbone_path, cast):
    """``model.to(torch.bfloat16)`` / ``model.half()`` cast the backbone; the queries, logit_scale and head keep their
    float32 values (they were cast too: logit_scale 2.659 became 2.656 in bf16, and AdamW steps of 5e-4 were below
    its resolution, so it never trained), gradients included."""
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, projection_dim=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item(t) for t in ("a cat", "a dog")])
    pair = {**batch, **{f"positive_{k}": v for k, v in batch.items()}}
    model(**pair).loss.backward()
    model = model.to(torch.bfloat16) if cast == "to_bfloat16" else model.half()
    assert model.backbone.dtype == (torch.bfloat16 if cast == "to_bfloat16" else torch.float16)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            assert torch.equal(param.detach(), before[name]), name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**pair).loss.backward()
        optimizer.step()
    assert model.logit_scale.item() != before["logit_scale"].item()


def test_4bit_embeddings_are_the_same_before_and_after_a_gradient_step_or_a_rerank(tiny_backbone_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacked the 4-bit weights for its inference kernel at the first
    no-grad call (encode, rerank), and a grad step switched back to the differentiable one, with absmax rounded to
    bf16: encode moved by ~1e-2 after a training step or a rerank, so in-training evaluation disagreed with the
    reloaded model. One kernel now serves every call."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.visual", "lm_head"])
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, quantization_config=quant)
    first = model.encode(INPUTS[:2])
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    model(**batch).pooler_output.sum().backward()
    assert model.queries.grad.abs().sum() > 0
    torch.testing.assert_close(model.encode(INPUTS[:2]), first, atol=1e-6, rtol=0)
    reranked = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES,
                                      quantization_config=quant)
    reranked.rerank("a red square", [scene(64, 64, (255, 0, 0))])
    torch.testing.assert_close(reranked.encode(INPUTS[:2]), first, atol=1e-6, rtol=0)


def test_4bit_backbone_on_cpu_with_fp32_queries(tiny_backbone_path, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernel needs in_features >= its block size (64); the tiny vision tower is 32 wide, so
    # it stays unquantised here (real backbones are far wider). The whole text model is quantised.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.visual", "lm_head"])
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES, quantization_config=quant)
    assert any(isinstance(m, Linear4bit) for m in model.backbone.modules())
    assert model.queries.dtype == torch.float32 and model.queries.requires_grad
    emb = model.encode(INPUTS)
    assert emb.shape == (len(INPUTS), model.config.hidden_size) and torch.isfinite(emb).all()
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    model(**batch).pooler_output.sum().backward()
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0
    # Saving a 4-bit model still writes queries only; reloading in 4-bit works the same way.
    model.save_pretrained(tmp_path / "slq")
    assert sorted(load_file(tmp_path / "slq" / "model.safetensors")) == ["logit_scale", "queries"]
    reloaded = AutoModel.from_pretrained(tmp_path / "slq", quantization_config=quant)
    assert any(isinstance(m, Linear4bit) for m in reloaded.backbone.modules())
    torch.testing.assert_close(reloaded.encode(INPUTS), emb, atol=1e-5, rtol=0)


def test_bad_option_fails_before_the_backbone_loads(tmp_path):
    # The path does not exist: a config error must come first, not a loading error.
    with pytest.raises(ValueError, match="`pooling`='max'"):
        SLQModel.from_backbone(str(tmp_path / "no-such-backbone"), num_queries=4, pooling="max")


def test_loaded_backbone_finds_its_processor(tiny_backbone_path):
    from transformers import AutoModelForImageTextToText

    backbone = AutoModelForImageTextToText.from_pretrained(tiny_backbone_path("qwen3_vl"))
    model = SLQModel.from_backbone(backbone, num_queries=2)
    assert model.processor is not None and model.encode(["x"]).shape == (1, model.config.hidden_size)


# ------------------------------------------------------------------------------------- loading as users do
def test_relative_backbone_path_is_pinned_absolute(tiny_backbone_path, tmp_path, monkeypatch):
    backbone = Path(tiny_backbone_path("qwen3_vl"))
    monkeypatch.chdir(backbone.parent)
    model = SLQModel.from_backbone(backbone.name, num_queries=NUM_QUERIES)
    assert model.config.backbone_name_or_path == str(backbone.resolve())
    model.save_pretrained(tmp_path / "slq")
    monkeypatch.chdir(tmp_path)  # another working directory: the pin still finds the backbone
    torch.testing.assert_close(AutoModel.from_pretrained("slq").encode(INPUTS[:1]), model.encode(INPUTS[:1]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("pinned", ["/no/such/backbone", "./missing-backbone"])
def test_missing_backbone_error_names_it_and_the_way_out(model, tmp_path, pinned):
    model.save_pretrained(tmp_path / "slq")
    config = json.loads((tmp_path / "slq" / "config.json").read_text())
    config["backbone_name_or_path"] = pinned
    (tmp_path / "slq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError) as err:
        SLQModel.from_pretrained(tmp_path / "slq")
    assert pinned in str(err.value) and "backbone_name_or_path=" in str(err.value)
    assert "config.json" in str(err.value)


def test_from_pretrained_keywords_override_the_config(model, tmp_path):
    model.save_pretrained(tmp_path / "slq")
    batch = slq_hf.processing.collate(model.processor, [slq_hf.processing.to_item("a cat")])
    reloaded = SLQModel.from_pretrained(tmp_path / "slq", pooling="last", normalize=False, num_queries=NUM_QUERIES)
    assert (reloaded.config.pooling, reloaded.config.normalize) == ("last", False)
    with torch.no_grad():
        out = reloaded(**batch)
    torch.testing.assert_close(out.pooler_output, out.query_states[:, -1].float())  # last query, not normalised
    assert abs(out.pooler_output.norm().item() - 1) > 1e-3
    for key, value in [("num_queries", NUM_QUERIES + 1), ("hidden_size", 999), ("projection_dim", 8),
                       ("projection_dim", model.config.hidden_size)]:  # the width is not a head
        with pytest.raises(ValueError, match=rf"{key}={value} cannot be changed"):
            SLQModel.from_pretrained(tmp_path / "slq", **{key: value})
    # from_backbone's own values for a model without a head are accepted (no head is what it was trained with)
    assert SLQModel.from_pretrained(tmp_path / "slq", projection_dim=None, projection_size=None).projection is None
    with pytest.raises(ValueError, match="`pooling`='max'"):
        SLQModel.from_pretrained(tmp_path / "slq", pooling="max")
    # Neither a config field nor a Hub argument: it reaches the backbone, and the error says so and names it.
    for load in (SLQModel.from_pretrained, AutoModel.from_pretrained, SLQModel.from_backbone):
        source = model.config.backbone_name_or_path if load == SLQModel.from_backbone else tmp_path / "slq"
        with pytest.raises(TypeError, match=r"'poolin'.*neither SLQConfig fields \(.*pooling.*\) nor Hub"):
            load(source, poolin="last")
    with pytest.raises(ValueError, match=r"is an SLQ model, not a backbone: load it with SLQModel.from_pretrained"):
        SLQModel.from_backbone(tmp_path / "slq")


def test_backbone_folder_without_processor_files(tiny_backbone_path, tmp_path):
    """A backbone saved with model.save_pretrained alone: forward, training steps and saving work; encode asks for
    processor= by name."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    full = tiny_backbone_path("qwen3_vl")
    AutoModelForImageTextToText.from_pretrained(full).save_pretrained(tmp_path / "weights_only")
    model = SLQModel.from_backbone(tmp_path / "weights_only", num_queries=NUM_QUERIES)
    assert model.processor is None
    batch = slq_hf.processing.collate(AutoProcessor.from_pretrained(full), [slq_hf.processing.to_item(INPUTS[2])])
    model(**batch).pooler_output.sum().backward()
    assert model.queries.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "slq")
    reloaded = AutoModel.from_pretrained(tmp_path / "slq")
    assert reloaded.processor is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).pooler_output, model(**batch).pooler_output, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="processor="):
        reloaded.encode(["a cat"])
    reloaded.processor = AutoProcessor.from_pretrained(full)
    assert reloaded.encode(["a cat"]).shape == (1, model.config.hidden_size)


def test_placeholder_and_vocab_init_use_only_plain_trained_ids(tiny_backbone_path):
    """Rows past the tokenizer (reserved, never trained: Qwen3-VL has 267 of them) and special tokens are never the
    placeholder or a "vocab" query."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_backbone_path("qwen3_vl")
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    backbone = AutoModelForImageTextToText.from_pretrained(path)
    backbone.resize_token_embeddings(len(tokenizer) + 64)
    embedding = backbone.get_input_embeddings().weight
    with torch.no_grad():
        embedding[len(tokenizer):] = 1e3  # reserved rows, recognisable
        special = sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))
        embedding[special] = -1e3
    model = SLQModel.from_backbone(backbone, num_queries=200, processor=processor, query_init="vocab")
    assert model.config.placeholder_token_id not in special
    assert model.config.placeholder_token_id < len(tokenizer)
    assert model.queries.abs().max() < 1e2  # no reserved or special row among the 200 sampled rows
    normal = SLQModel.from_backbone(backbone, num_queries=200, processor=processor)
    assert normal.queries.std() < 1  # the init scale comes from plain rows only (reserved rows would give ~1e3)


def test_automodel_keywords_are_checked_and_applied_like_from_pretrained(model, tmp_path):
    """AutoModel.from_pretrained hands SLQConfig keywords to AutoConfig, which set them unchecked (pooling='max'
    loaded and pooled like 'last') and consumed attn_implementation (the backbone never got it)."""
    model.save_pretrained(tmp_path / "slq")
    for load in (SLQModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match="`pooling`='max' is not supported"):
            load(tmp_path / "slq", pooling="max")
        with pytest.raises(ValueError, match="`normalize`='no' is invalid"):
            load(tmp_path / "slq", normalize="no")
        for key, value in [("num_queries", NUM_QUERIES + 1), ("projection_dim", 8), ("temperature", 0.5)]:
            with pytest.raises(ValueError, match=rf"{key}={value} cannot be changed"):
                load(tmp_path / "slq", **{key: value})
        eager = load(tmp_path / "slq", attn_implementation="eager", pooling="last")
        assert eager.backbone.config._attn_implementation == "eager" and eager.config.pooling == "last"


def test_backbone_override_pins_the_revision_it_loaded(model, tmp_path, monkeypatch):
    """backbone_name_or_path= with the revision of the original pin: SLQModel loaded no revision but kept the old one
    in the config (a re-save pinned mirror@old), ignored backbone_revision=, and AutoModel loaded the old one."""
    import slq_hf.modeling.modeling_slq as modeling

    model.save_pretrained(tmp_path / "slq")
    config = json.loads((tmp_path / "slq" / "config.json").read_text())
    (tmp_path / "slq" / "config.json").write_text(json.dumps({**config, "backbone_revision": "0123abc"}))
    loaded, real = [], modeling._load_backbone

    def spy(name, revision=None, folder=None, **kwargs):
        loaded.append((name, revision))
        return real(model.config.backbone_name_or_path, None, folder, **kwargs)

    monkeypatch.setattr(modeling, "_load_backbone", spy)
    for load in (SLQModel.from_pretrained, AutoModel.from_pretrained):
        for given, revision in [({}, None), ({"backbone_revision": "fff"}, "fff")]:
            loaded.clear()
            reloaded = load(tmp_path / "slq", backbone_name_or_path="org/mirror", **given)
            assert loaded == [("org/mirror", revision)]
            assert (reloaded.config.backbone_name_or_path, reloaded.config.backbone_revision) == ("org/mirror",
                                                                                                  revision)
    loaded.clear()
    SLQModel.from_pretrained(tmp_path / "slq")  # the pinned backbone keeps its pinned revision
    assert loaded == [(config["backbone_name_or_path"], "0123abc")]


def test_queries_loaded_onto_another_backbone_type_warn(model, tmp_path, tiny_backbone_path, caplog):
    model.save_pretrained(tmp_path / "slq")
    with caplog.at_level("WARNING"):
        SLQModel.from_pretrained(tmp_path / "slq")
    assert "trained on a" not in caplog.text
    with caplog.at_level("WARNING"):
        SLQModel.from_pretrained(tmp_path / "slq", backbone_name_or_path=tiny_backbone_path("llava"))
    assert "trained on a 'qwen3_vl' backbone but the backbone loaded is a 'llava' one" in caplog.text
    assert str(tmp_path / "slq") in caplog.text
