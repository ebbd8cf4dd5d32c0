"""Supported backbone families, one row each: everything SLQ needs to know about a family.

The model code reads these rows (``spec.rope``, ``spec.token_keys``, ...) instead of branching on model types; adding
a family is one ``BACKBONES`` row plus a tiny twin for the tests. Ships inside every checkpoint (remote code):
torch/transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import special_token_ids


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone family's contract with SLQ.

    Attributes:
        family: human-readable family name.
        rope: ``"mrope"`` when positions come from the model's own ``get_rope_index`` (Qwen-VL: 3-D positions and a
            per-row rope delta after images); ``"1d"`` for plain 1-D RoPE, where positions are the padded index.
        rope_index_keys: processor outputs ``get_rope_index`` takes besides ids and mask (passed by name).
        token_keys: per-token inputs besides ``attention_mask`` that must be re-laid with the ids and extended with
            zeros for the query slots (e.g. Qwen's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``).
        block_mask: whether several query sets may share one prompt pass through a 4-D block mask. Not with
            sliding-window attention layers (Gemma 3): they keep only a window of prompt keys.
        tiny: ``"module:function"`` in ``slq_hf.testing`` building the family's tiny random twin for tests.
    """

    family: str
    rope: str = "1d"
    rope_index_keys: tuple[str, ...] = ()
    token_keys: tuple[str, ...] = ()
    block_mask: bool = True
    tiny: str | None = None


_QWEN: dict[str, Any] = {
    "rope": "mrope", "token_keys": ("mm_token_type_ids", "token_type_ids"),
    "rope_index_keys": ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")}

BACKBONES: dict[str, BackboneSpec] = {
    "qwen2_vl": BackboneSpec("Qwen2-VL", **_QWEN, tiny="tiny_qwen:qwen2_vl"),
    "qwen2_5_vl": BackboneSpec("Qwen2.5-VL", **_QWEN, tiny="tiny_qwen:qwen2_5_vl"),
    "qwen3_vl": BackboneSpec("Qwen3-VL", **_QWEN, tiny="tiny_qwen:qwen3_vl"),
    "internvl": BackboneSpec("InternVL", tiny="tiny_others:internvl"),
    "llava": BackboneSpec("LLaVA", tiny="tiny_llava:llava"),
    "llava_next": BackboneSpec("LLaVA-NeXT", tiny="tiny_llava:llava_next"),
    "llava_onevision": BackboneSpec("LLaVA-OneVision", tiny="tiny_llava:llava_onevision"),
    "idefics3": BackboneSpec("Idefics3", tiny="tiny_others:idefics3"),
    "smolvlm": BackboneSpec("SmolVLM", tiny="tiny_others:smolvlm"),
    "gemma3": BackboneSpec("Gemma 3", token_keys=("token_type_ids",), block_mask=False,
                           tiny="tiny_others:gemma3"),
}


def backbone_spec(model_type: str) -> BackboneSpec:
    """Return the registry row for ``model_type`` or raise ValueError listing what is supported."""
    try:
        return BACKBONES[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({v.family})" for k, v in BACKBONES.items())
        raise ValueError(
            f"SLQ does not support backbone model_type {model_type!r}. Supported model types: {supported}."
        ) from None


def block_mask_allowed(spec: BackboneSpec, backbone: nn.Module) -> bool:
    """The row's ``block_mask``, and no sliding-window layer in this particular config (a windowed Mistral LLaVA)."""
    text = backbone.config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        sliding = any("sliding" in str(kind) for kind in layer_types)
    else:
        sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    return spec.block_mask and not sliding


def usable_token_ids(backbone_config: Any, num_rows: int, tokenizer: Any = None) -> torch.Tensor:
    """(U,) ascending ids of plain, trained tokens, for the query placeholder and the ``"vocab"`` query init.

    Every family alike: below ``len(tokenizer)`` (embedding rows past it are reserved padding that was never trained,
    e.g. Qwen3-VL's 151,669-151,935), not a special or added token of the tokenizer, and not an id the config names
    as structure (image/video/vision markers: ``checkpoint.special_token_ids``). Without a tokenizer only the config's
    ids and the embedding size are known.
    """
    count = min(num_rows, len(tokenizer)) if tokenizer is not None else num_rows
    special = special_token_ids(backbone_config) | {getattr(backbone_config.get_text_config(), "pad_token_id", None)}
    if tokenizer is not None:
        special |= set(getattr(tokenizer, "all_special_ids", ()))
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}))
    keep = torch.ones(count, dtype=torch.bool)
    special_ids = [i for i in special if isinstance(i, int) and 0 <= i < count]
    keep[special_ids] = False
    ids = keep.nonzero().flatten()
    if ids.numel() == 0:
        raise ValueError(f"{type(backbone_config).__name__}: no plain token id left for the query placeholder "
                         f"(vocabulary {count}, special ids {sorted(special_ids)[:10]}).")
    return ids


def embedding_rows(embedding: nn.Module, ids: torch.Tensor, num_samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """(S, H) float32 rows of the embedding layer's OUTPUT for up to ``num_samples`` distinct ids out of ``ids``.

    Going through the module (not ``.weight``) includes any scaling the layer applies (Gemma multiplies by
    sqrt(hidden)), so queries initialised from these rows live on the same scale as real token embeddings.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = ids[torch.randperm(ids.numel(), generator=generator)[:num_samples]]
    with torch.no_grad():
        return embedding(chosen.to(embedding.weight.device)).float().cpu()
