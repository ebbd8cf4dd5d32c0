"""Per-family facts about supported backbones, as one table.

Everything SLQ needs to know about a backbone family lives in ``BACKBONES``; the model code looks rows up here
instead of branching on model types. Ships inside every checkpoint (remote code): torch/transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between backbone families.

    Attributes:
        family: human-readable family name.
        rope: ``"mrope"`` when positions come from the model's own ``get_rope_index`` (Qwen-VL: 3-D positions and a
            per-row rope delta after images); ``"1d"`` for plain 1-D RoPE, where positions are the padded index.
        token_keys: per-token inputs besides ``attention_mask`` that must be re-laid with the ids and extended with
            zeros for the query slots (e.g. Qwen's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``).
    """

    family: str
    rope: str = "1d"
    token_keys: tuple[str, ...] = ()


_QWEN_KEYS = ("mm_token_type_ids", "token_type_ids")

BACKBONES: dict[str, BackboneSpec] = {
    "qwen2_vl": BackboneSpec("Qwen2-VL", rope="mrope", token_keys=_QWEN_KEYS),
    "qwen2_5_vl": BackboneSpec("Qwen2.5-VL", rope="mrope", token_keys=_QWEN_KEYS),
    "qwen3_vl": BackboneSpec("Qwen3-VL", rope="mrope", token_keys=_QWEN_KEYS),
    "internvl": BackboneSpec("InternVL"),
    "llava": BackboneSpec("LLaVA"),
    "llava_next": BackboneSpec("LLaVA-NeXT"),
    "llava_onevision": BackboneSpec("LLaVA-OneVision"),
    "idefics3": BackboneSpec("Idefics3"),
    "smolvlm": BackboneSpec("SmolVLM"),
    "gemma3": BackboneSpec("Gemma 3", token_keys=("token_type_ids",)),
}

# Config attributes that name multimodal special tokens; the query placeholder id must avoid all of them.
_SPECIAL_ID_ATTRS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "boi_token_index",
    "eoi_token_index",
    "image_seq_token_id",
)


def backbone_spec(model_type: str) -> BackboneSpec:
    """Return the registry row for ``model_type`` or raise ValueError listing what is supported."""
    try:
        return BACKBONES[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({v.family})" for k, v in BACKBONES.items())
        raise ValueError(
            f"SLQ does not support backbone model_type {model_type!r}. Supported model types: {supported}."
        ) from None


def pick_placeholder_token_id(backbone_config) -> int:
    """Smallest token id that is not a multimodal special token of this backbone.

    The hook replaces the embedding of these slots, so any id works as long as the backbone's own image scatter
    and rope-index code treat it as plain text.
    """
    special = {getattr(backbone_config, a, None) for a in _SPECIAL_ID_ATTRS}
    candidate = 0
    while candidate in special:
        candidate += 1
    return candidate


def input_embedding_stats(embedding: torch.nn.Module, num_samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """Rows of the embedding layer's OUTPUT for random ids: (num_samples, hidden) in float32.

    Going through the module (not ``.weight``) includes any scaling the layer applies (Gemma multiplies by
    sqrt(hidden)), so queries initialised from these rows live on the same scale as real token embeddings.
    """
    weight = embedding.weight
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (num_samples,), generator=generator).to(weight.device)
    with torch.no_grad():
        return embedding(ids).float().cpu()
