"""The prefix-cache training path equals the full forward on every tiny backbone family, and the test can fail.

For each family in TINY_FAMILIES and each attention implementation (sdpa, eager), padded batches of texts, images,
image+text items and a mix of all three go through ``SLQModel.embed`` twice: with ``training_path="full"`` (one
forward of prompt + queries, the paper's procedure) and ``"prefix_cache"`` (prompt under no_grad into a KV cache,
then one grad pass of the queries). Embeddings must agree to 1e-5 and query gradients to 1e-4 relative.

Negative controls show the comparison is sensitive: with a wrong position rule (Qwen-VL without the rope delta,
1-D backbones with mask-aware positions) the embeddings differ by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch

import slq_hf.modeling.positions as positions
import slq_hf.modeling.prefix_cache as prefix_cache
from slq_hf import SLQModel
from slq_hf.modeling.backbones import backbone_spec
from slq_hf.processing import collate, to_items
from slq_hf.testing import TINY_FAMILIES

from helpers import count_prompt_passes, scene, sharpen_attention

NUM_QUERIES = 4
EMBED_TOL = 1e-5
GRAD_REL_TOL = 1e-4
# A wrong position rule must move embeddings by at least 10x the tolerance: proof the equivalence test can fail.
WRONG_RULE_MIN_DIFF = 10 * EMBED_TOL

FAMILIES = sorted(TINY_FAMILIES)
ATTN = ["sdpa", "eager"]
MROPE_FAMILIES = [f for f in FAMILIES if backbone_spec(TINY_FAMILIES[f].model_type).rope == "mrope"]


# Lengths differ inside every batch, so rows are padded; images of two sizes give different rope deltas.
BATCHES = {
    "text": ["a red square on a grey background", "hello", "what animal is this? describe the image."],
    "image": [scene(64, 64, (255, 0, 0)), scene(96, 64, (0, 0, 255))],
    "image+text": [{"image": scene(64, 64, (0, 255, 0)), "text": "what shape is this?"},
                   {"image": scene(96, 64, (255, 255, 0)), "text": "a blue circle"}],
    "mixed": ["a green triangle", scene(64, 64, (255, 0, 0)),
              {"image": scene(96, 64, (0, 0, 255)), "text": "what shape is this? describe the image."}, "hi"],
}


@pytest.fixture(scope="module")
def models(tiny_backbone_path):
    """(family, attn) -> SLQModel, loaded once per module; tests only toggle config.training_path."""
    cache: dict[tuple[str, str], SLQModel] = {}

    def get(family: str, attn: str) -> SLQModel:
        if (family, attn) not in cache:
            model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES,
                                           attn_implementation=attn)
            with torch.no_grad():
                # Distinct, larger-than-init queries: a misplaced or mis-positioned query shows clearly.
                model.queries.copy_(torch.randn(model.queries.shape, generator=torch.Generator().manual_seed(1)))
            sharpen_attention(model.backbone)
            cache[family, attn] = model
        return cache[family, attn]

    return get


def _batch(model: SLQModel, kind: str):
    return dict(collate(model.processor, to_items(BATCHES[kind])))


def _step(model: SLQModel, batch: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed with grad on ``path`` and back-propagate a fixed loss; returns (embeddings (B, D), queries.grad)."""
    model.config.training_path = path
    model.queries.grad = None
    embeddings, _ = model.embed(**batch)  # (B, D)
    # A loss that weighs every embedding dimension differently, so wrong gradients cannot cancel out.
    directions = torch.randn(embeddings.shape[1], 8, generator=torch.Generator().manual_seed(2))  # (D, 8)
    (embeddings @ directions).square().sum().backward()
    return embeddings.detach(), model.queries.grad.clone()


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_equals_full_forward(models, family, attn, kind, monkeypatch):
    model = models(family, attn)
    batch = _batch(model, kind)
    if kind != "image":  # fixed-resolution processors (LLaVA, Gemma 3, ...) give equal-length image-only prompts
        assert (batch["attention_mask"] == 0).any(), "the batch must be padded for this test to mean anything"
    calls = count_prompt_passes(monkeypatch)

    full_emb, full_grad = _step(model, batch, "full")
    assert not calls, "training_path='full' must not build a prefix cache"
    fast_emb, fast_grad = _step(model, batch, "prefix_cache")
    assert len(calls) == 1, "training_path='prefix_cache' with grad on a frozen backbone must use the prefix cache"

    emb_diff = (full_emb - fast_emb).abs().max().item()
    grad_rel = ((full_grad - fast_grad).norm() / full_grad.norm()).item()
    print(f"{family} {attn} {kind}: max |emb diff| {emb_diff:.2e}, grad rel diff {grad_rel:.2e}")
    assert full_grad.norm() > 0
    assert emb_diff <= EMBED_TOL
    assert grad_rel <= GRAD_REL_TOL


def _mask_aware_rule(base_model, spec, input_ids, attention_mask, offsets, backbone_inputs):
    """WRONG on purpose: n_real + j (no rope delta for Qwen-VL, mask-aware instead of padded for 1-D backbones)."""
    n_real = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    wrong = n_real + offsets.unsqueeze(0)  # (B, Q)
    if backbone_inputs.get("image_grid_thw") is not None:  # M-RoPE batches take (3, B, Q)
        wrong = wrong.unsqueeze(0).expand(3, -1, -1)
    return wrong


@pytest.mark.parametrize("kind", ["text", "mixed"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_position_rule_is_detected(models, family, attn, kind, monkeypatch):
    """Negative control: swap the family's position rule for n_real + j and the embeddings move far beyond 1e-5.

    "text" checks the padded-length rule (every family numbers a padded text batch 0..L+N_q-1), "mixed" the rope
    delta of Qwen-VL image rows (and the padded-length rule again for 1-D backbones).
    """
    model = models(family, attn)
    batch = _batch(model, kind)
    full_emb, _ = _step(model, batch, "full")
    monkeypatch.setitem(positions.POSITION_RULES, model.spec.rope, _mask_aware_rule)
    wrong_emb, _ = _step(model, batch, "prefix_cache")
    diff = (full_emb - wrong_emb).abs().max().item()
    print(f"{family} {attn} {kind}: wrong rule moves embeddings by {diff:.2e}")
    assert diff > WRONG_RULE_MIN_DIFF


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_stale_rope_deltas_are_never_read(models, family):
    """Qwen-VL caches rope_deltas on the model: neither a text batch after images nor garbage there changes a thing."""
    model = models(family, "sdpa")
    text = _batch(model, "text")
    image = _batch(model, "mixed")
    reference, _ = _step(model, text, "full")
    _step(model, image, "prefix_cache")  # leaves image-batch deltas behind
    after_images, _ = _step(model, text, "prefix_cache")
    # Garbage that a text-only prompt pass leaves in place (only image batches recompute it): reading it would shift
    # every query position by 1000.
    model.backbone.base_model.rope_deltas = torch.full((1, 1), 1000)
    with_garbage, _ = _step(model, text, "prefix_cache")
    assert (reference - after_images).abs().max() <= EMBED_TOL
    assert (reference - with_garbage).abs().max() <= EMBED_TOL


def test_prefix_cache_only_for_grad_steps_on_a_frozen_backbone(models, monkeypatch):
    model = models("qwen3_vl", "sdpa")
    batch = _batch(model, "mixed")
    calls = count_prompt_passes(monkeypatch)
    model.config.training_path = "prefix_cache"
    with torch.no_grad():
        model.embed(**batch)
    assert not calls, "inference needs no cache: one full forward"
    layer = model.backbone.get_input_embeddings()
    layer.weight.requires_grad_(True)
    try:
        model.embed(**batch)
        assert not calls, "an unfrozen backbone needs gradients through the prompt: full forward"
    finally:
        layer.weight.requires_grad_(False)
    model.embed(**batch)
    assert len(calls) == 1


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_query_sets_in_one_pass_equal_separate_passes(models, family, attn):
    """K query sets on one prompt (block mask, repeated offsets) = each set run on its own; refused (not silently
    wrong) on backbones with sliding-window layers."""
    model = models(family, attn)
    batch = _batch(model, "mixed")
    num_sets = 3
    sets = torch.randn(num_sets * NUM_QUERIES, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    ids, mask, relaid = model._relay_left(batch["input_ids"], batch["attention_mask"], batch, 0)
    prompt = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    prompt.update(relaid)
    base, spec = model.backbone.base_model, model.spec
    sizes = [NUM_QUERIES] * num_sets
    if "sliding_attention" in (getattr(model.backbone.config.get_text_config(), "layer_types", None) or ()):
        with pytest.raises(ValueError, match="sliding-window"), torch.no_grad():
            prefix_cache.prefix_cache_query_states(base, spec, ids, mask, sets, prompt, sizes)
        return
    with torch.no_grad():
        together = prefix_cache.prefix_cache_query_states(base, spec, ids, mask, sets, prompt, sizes)  # (B, K*N_q, H)
        for k in range(num_sets):
            alone = prefix_cache.prefix_cache_query_states(base, spec, ids, mask,
                                                           sets[k * NUM_QUERIES:(k + 1) * NUM_QUERIES], prompt)
            diff = (together[:, k * NUM_QUERIES:(k + 1) * NUM_QUERIES] - alone).abs().max().item()
            assert diff <= EMBED_TOL, f"query set {k}: {diff:.2e}"
