"""Position ids of the latent queries: the one place that knows them, per backbone family.

The prefix-cache training path (``prefix_cache.py``) runs the prompt once with a KV cache and then feeds only the
queries, so it must hand the backbone the exact positions the queries would get in a full forward of
``prompt + queries``. Those positions are what each backbone's OWN forward assigns, which differs by family:

- ``"mrope"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with images or videos in the batch: the backbone computes 3-D
  positions with ``get_rope_index`` over the real (unmasked) tokens; an image of h x w merged patches advances the
  position by only max(h, w), so every row ends with its own ``rope_delta`` = (last position + 1) - (real tokens).
  Query j of a row sits at ``n_real + j + rope_delta``. The delta comes from our own ``get_rope_index`` call on the
  prompt: the model's cached ``rope_deltas`` attribute is whatever the previous call left there (stale after a
  text-only batch) and is never read.
- everything else (Qwen-VL text-only batches, plain 1-D RoPE backbones): the backbone numbers the padded sequence
  ``0 .. L + N_q - 1`` regardless of the mask (left padding included), so query j sits at ``L + j``. Mask-aware
  positions (``n_real + j``) would be wrong here.

Which rule applies is read from the backbone's ``BackboneSpec.rope`` row (``backbones.py``), never from if/elif
chains on model types. SLQ also hands M-RoPE backbones the positions of its full passes and prompt passes
(:func:`sequence_position_ids`): left to itself, the backbone would store that call's rope deltas on the shared
model object, where a ``generate`` running in another thread reads them. Ships inside every checkpoint (remote
code): torch/transformers + siblings only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backbones import BackboneSpec


def _has_vision(backbone_inputs: dict[str, Any]) -> bool:
    return any(backbone_inputs.get(k) is not None for k in ("image_grid_thw", "video_grid_thw"))


def _rope_index(base_model, spec: BackboneSpec, input_ids, attention_mask, backbone_inputs):
    """The backbone's own ``get_rope_index``: ((3, B, L) positions, (B, 1) rope deltas)."""
    if backbone_inputs.get("mm_token_type_ids") is None:
        raise ValueError("The batch holds images/videos but no `mm_token_type_ids`; Qwen-VL needs them (the processor "
                         "returns them) to compute M-RoPE positions.")
    rope_index = getattr(base_model, "get_rope_index", None)
    if rope_index is None:
        raise ValueError(f"{type(base_model).__name__} has no get_rope_index, but its BackboneSpec says rope='mrope'.")
    kwargs = {k: backbone_inputs[k] for k in spec.rope_index_keys if backbone_inputs.get(k) is not None}
    return rope_index(input_ids, attention_mask=attention_mask, **kwargs)


def sequence_position_ids(base_model: torch.nn.Module, spec: BackboneSpec, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, backbone_inputs: dict[str, Any]) -> torch.Tensor | None:
    """(3, B, L) positions an M-RoPE backbone computes itself for a batch with images, else None (the backbone
    numbers the sequence without touching shared state)."""
    if spec.rope != "mrope" or not _has_vision(backbone_inputs):
        return None
    return _rope_index(base_model, spec, input_ids, attention_mask, backbone_inputs)[0]


def padded_positions(base_model: torch.nn.Module, spec: BackboneSpec, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, offsets: torch.Tensor, backbone_inputs: dict[str, Any]
                     ) -> torch.Tensor:
    """1-D rule: query j of every row sits right after the padded prompt, at ``L + j`` (the mask is not used: the
    backbone ignores it when numbering positions). Arguments as for :func:`query_position_ids`; returns (B, Q) long."""
    batch, length = input_ids.shape
    return (length + offsets.to(input_ids.device)).unsqueeze(0).expand(batch, -1)


def mrope_positions(
    base_model: torch.nn.Module,
    spec: BackboneSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    offsets: torch.Tensor,
    backbone_inputs: dict[str, Any],
) -> torch.Tensor:
    """M-RoPE rule (Qwen-VL): ``n_real + j + rope_delta`` on all three axes when the batch holds images or videos.

    Text-only batches fall back to :func:`padded_positions`, because the backbone itself numbers a text-only batch
    by padded index (it only calls ``get_rope_index`` when image or video grids are given). Arguments as for
    :func:`query_position_ids` (``base_model`` owns ``get_rope_index``, ``spec`` gives its ``rope_index_keys``);
    returns (3, B, Q) long position ids (temporal, height, width), or (B, Q) for a text-only batch.
    """
    if not _has_vision(backbone_inputs):
        return padded_positions(base_model, spec, input_ids, attention_mask, offsets, backbone_inputs)
    # Our own call on the prompt: the delta of each row is (last position + 1) - (number of real tokens).
    _, deltas = _rope_index(base_model, spec, input_ids, attention_mask, backbone_inputs)  # deltas: (B, 1)
    n_real = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    start = n_real + deltas.to(n_real.device).long()  # (B, 1): first query position of each row
    positions = start + offsets.to(start.device).unsqueeze(0)  # (B, Q)
    return positions.unsqueeze(0).expand(3, -1, -1)  # (3, B, Q): queries are text, same index on every axis


# BackboneSpec.rope -> rule. A new family only needs a registry row; a new position scheme needs one entry here.
POSITION_RULES: dict[str, Callable[..., torch.Tensor]] = {"mrope": mrope_positions, "1d": padded_positions}


def query_position_ids(
    base_model: torch.nn.Module,
    spec: BackboneSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    backbone_inputs: dict[str, Any] | None = None,
    *,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """Position ids the backbone would give the query slots appended after a left-padded prompt.

    Args:
        base_model: the backbone's base model (``backbone.base_model``).
        spec: the backbone family's registry row.
        input_ids: (B, L) left-padded prompt ids, without query slots.
        attention_mask: (B, L) prompt mask.
        backbone_inputs: other processor outputs of the prompt (grids, ``mm_token_type_ids`` (B, L), ...).
        offsets: (Q,) offset of each query slot from the first; several query sets on one prompt repeat
            ``arange(N_q)`` so every set sees the positions a lone set would.

    Returns:
        (B, Q) for 1-D positions or (3, B, Q) for M-RoPE, long, on the ids' device.
    """
    try:
        rule = POSITION_RULES[spec.rope]
    except KeyError:
        raise ValueError(f"BackboneSpec.rope={spec.rope!r} for {spec.family} has no position rule; known rules: "
                         f"{sorted(POSITION_RULES)}.") from None
    return rule(base_model, spec, input_ids, attention_mask, offsets.long(), backbone_inputs or {})
