"""Every supported backbone family, on its tiny offline twin, under sdpa and eager attention (fp32).

For each family in TINY_FAMILIES (real transformers config/model/processor classes, random weights):
- an item alone and the same item inside a padded batch embed the same (texts, images, image+text items);
- left and right padding embed the same, and a batch mixing text-only and image items equals each item alone;
- a backward pass reaches only SLQ's own parameters, and an optimizer step leaves the backbone bitwise unchanged;
- the backbone's own ``generate`` gives the same tokens with SLQ attached (also right after ``encode``) as a
  separately loaded copy without SLQ;
- an unsupported backbone type is refused with the list of supported ones.

Random tiny models attend almost uniformly, which would hide position or layout mistakes; the equality tests
therefore sharpen attention first, and a negative control (pads attended) proves the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from slq_hf import SLQModel
from slq_hf.modeling.backbones import BACKBONES
from slq_hf.processing import collate, to_items
from slq_hf.testing import TINY_FAMILIES

from helpers import scene, sharpen_attention

NUM_QUERIES = 4
TOL = 1e-5
# Attending to pads must move embeddings by at least this much, or the equality tests could not see a layout bug.
CONTROL_MIN_DIFF = 10 * TOL
FAMILIES = sorted(TINY_FAMILIES)
ATTN = ["sdpa", "eager"]


# Two items of each kind, of different lengths where the family's processor allows it (dynamic-resolution
# families give the two image sizes different token counts; fixed-size ones do not).
ITEMS = {
    "text": ["a red square", "what animal is this? describe the image in one sentence."],
    "image": [scene(64, 64, (255, 0, 0)), scene(96, 48, (0, 0, 255))],
    "image+text": [{"image": scene(64, 64, (0, 255, 0)), "text": "what shape is this?"},
                   {"image": scene(48, 96, (255, 255, 0)), "text": "a blue circle"}],
}
# Longer than any prompt above, so every item under test gets padding even where all images cost the same tokens.
FILLER = "the quick brown fox jumps over a green triangle in the top left corner, then describe the picture " * 2
MIXED = ["a green triangle", ITEMS["image"][0], ITEMS["image+text"][1], "hello world", ITEMS["image"][1]]


def _load(tiny_backbone_path, family: str, attn: str, sharpen: bool = True, **kwargs) -> SLQModel:
    model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=NUM_QUERIES, attn_implementation=attn,
                                   **kwargs)
    assert model.backbone.config.get_text_config()._attn_implementation == attn
    if sharpen:
        sharpen_attention(model.backbone)
    return model


def _force_side(batch, side: str):
    """Move every row's pads to ``side`` with a per-row Python loop (independent of SLQModel's own re-lay).

    Needed because some processors pin their padding side (InternVL always pads left, whatever the tokenizer says).
    All per-token tensors (input_ids, attention_mask, mm_token_type_ids, token_type_ids...) move together.
    """
    mask = batch["attention_mask"]
    batch_size, length = mask.shape
    orders = []
    for row in mask.tolist():
        real = [i for i, m in enumerate(row) if m]
        pads = [i for i, m in enumerate(row) if not m]
        orders.append(pads + real if side == "left" else real + pads)
    order = torch.tensor(orders)  # (B, L)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.shape == (batch_size, length):
            batch[key] = value.gather(1, order)
    return batch


def _collate(processor, items, side: str | None = None):
    """The model's own collate, with the tokenizer's padding side set (and enforced) when ``side`` is given."""
    if side is not None:
        processor.tokenizer.padding_side = side
    batch = collate(processor, to_items(items))
    if side is not None:
        batch = _force_side(batch, side)
        column = 0 if side == "left" else -1
        assert (batch["attention_mask"][:, column] == 0).any(), f"batch is not {side}-padded"
    return batch


@torch.no_grad()
def _embed(model: SLQModel, batch) -> torch.Tensor:
    return model(**batch).pooler_output  # (B, D)


def _alone(model: SLQModel, items) -> torch.Tensor:
    """Each item in a batch of its own: no padding anywhere. (N, D)"""
    return torch.cat([_embed(model, _collate(model.processor, [item])) for item in items])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------- registry
def test_every_supported_backbone_has_a_tiny_twin():
    assert set(TINY_FAMILIES) == set(BACKBONES)
    assert all(family.model_type == key for key, family in TINY_FAMILIES.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_backbone_is_the_real_family(tiny_backbone_path, family):
    config = AutoConfig.from_pretrained(tiny_backbone_path(family))
    assert config.model_type == family
    text = config.get_text_config()
    assert 32 <= text.hidden_size <= 64 and text.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("kind", list(ITEMS))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_item_alone_equals_item_in_padded_batch(tiny_backbone_path, family, attn, kind):
    model = _load(tiny_backbone_path, family, attn)
    items = ITEMS[kind]
    expected = _alone(model, items)
    batch = _collate(model.processor, [*items, FILLER])
    mask = batch["attention_mask"]
    assert (mask[: len(items)] == 0).any(dim=1).all(), "every item under test must be padded"
    got = _embed(model, batch)[: len(items)]
    assert _max_diff(got, expected) <= TOL

    # Negative control: attending to the pads must change the padded rows, so the comparison above can fail.
    leaked = _embed(model, {**batch, "attention_mask": torch.ones_like(mask)})[: len(items)]
    assert _max_diff(leaked, expected) >= CONTROL_MIN_DIFF


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_agree(tiny_backbone_path, family, attn):
    model = _load(tiny_backbone_path, family, attn)
    left = _collate(model.processor, MIXED, "left")
    right = _collate(model.processor, MIXED, "right")
    assert not torch.equal(left["input_ids"], right["input_ids"])
    assert _max_diff(_embed(model, left), _embed(model, right)) <= TOL


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_text_and_image_batch_equals_each_alone(tiny_backbone_path, family, attn):
    model = _load(tiny_backbone_path, family, attn)
    batch = _collate(model.processor, MIXED)
    assert batch["input_ids"].shape[0] == len(MIXED)
    got = _embed(model, batch)
    assert _max_diff(got, _alone(model, MIXED)) <= TOL
    # encode sorts by modality and length and batches internally; it must give the same answer in input order.
    assert _max_diff(model.encode(MIXED, batch_size=len(MIXED)), got) <= TOL


# ------------------------------------------------------------------------------------------------------ frozen
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_slq_parameters_train(tiny_backbone_path, family, attn):
    model = _load(tiny_backbone_path, family, attn, sharpen=False, projection_dim=8)
    model.train()
    backbone_before = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    queries_before = model.queries.detach().clone()

    pooled = model(**_collate(model.processor, MIXED)).pooler_output  # (B, D)
    # A contrastive-style loss that uses the temperature too: row i should match row i+1 (mod B).
    logits = model.logit_scale.exp() * pooled @ pooled.roll(1, dims=0).T  # (B, B)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(MIXED)))
    loss.backward()

    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"latent_queries.default", "logit_scale", "projection.weight", "projection.bias"}
    assert torch.isfinite(model.queries.grad).all() and model.queries.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.step()
    assert not torch.equal(model.queries.detach(), queries_before), "the step must move the queries"
    backbone_after = model.backbone.state_dict()
    assert backbone_after.keys() == backbone_before.keys()
    changed = [k for k, v in backbone_before.items() if not torch.equal(v, backbone_after[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"


# ---------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_unchanged_by_slq(tiny_backbone_path, family, attn):
    path = tiny_backbone_path(family)
    reference = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn).eval()
    model = _load(tiny_backbone_path, family, attn, sharpen=False)
    # The embedding hook stays registered while the backbone generates: that is what this test is about.
    assert model.backbone.get_input_embeddings()._forward_hooks

    prompts = [ITEMS["image+text"][0], "describe the picture"]
    batch = _collate(model.processor, prompts, "left")  # generation continues each row at the end: left padding
    # Scores too: a random tiny model may repeat one token, and equal tokens alone would then prove little.
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=model.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = reference.generate(**batch, **settings)
        before = model.backbone.generate(**batch, **settings)
        model.encode(prompts)
        after = model.backbone.generate(**batch, **settings)
    assert expected.sequences.shape == (2, batch["input_ids"].shape[1] + 4)
    for output in (before, after):
        assert torch.equal(output.sequences, expected.sequences)
        assert all(torch.equal(a, b) for a, b in zip(output.scores, expected.scores, strict=True))


# -------------------------------------------------------------------------------------------------- unsupported
def _tiny_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=32),
        image_token_index=127, projection_dim=32, hidden_size=32,
    )
    return PaliGemmaForConditionalGeneration(config).eval()


def test_unsupported_backbone_type_lists_supported_types(tmp_path):
    backbone = _tiny_paligemma()
    backbone.save_pretrained(tmp_path)
    for source in (backbone, str(tmp_path)):
        with pytest.raises(ValueError, match="paligemma") as info:
            SLQModel.from_backbone(source, num_queries=NUM_QUERIES)
        message = str(info.value)
        assert all(model_type in message for model_type in BACKBONES), message
