"""Training fast path: the prompt runs once without grad into a KV cache, only the queries run with grad.

Queries sit after the last prompt token and attention is causal, so no prompt state depends on them: the prompt's
keys/values are constants for the gradient. One step is

1. the backbone's own base-model forward of the (left-padded) prompt under ``torch.no_grad()`` with
   ``use_cache=True`` (images, DeepStack and M-RoPE handled by the backbone as usual);
2. ONE grad pass of ``inputs_embeds = queries`` with that cache, a 2-D mask ``cat(prompt_mask, ones(Q))`` and
   explicit position ids from ``positions.py`` (the backbone cannot infer them from embeddings alone).

It equals the full forward of ``prompt + queries`` (to ~1e-7 in fp32, query gradients ~2e-6 relative), while the
backward pass only goes through Q tokens per row. The cache is built and dropped inside one call: it is never reused
across steps, where the prompt would differ.

Several query sets can share one prompt: pass their queries concatenated with ``sizes``; a block mask keeps each set
causal within itself and blind to the others, and every set reads the same prompt at the positions it gets alone.

Ships inside every checkpoint (remote code): torch/transformers + siblings only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .backbones import BackboneSpec
from .positions import query_position_ids, sequence_position_ids


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """Name of the KV-cache argument of ``model_class.forward`` and of its output field: ``cache`` from
    transformers 5.24 on (where ``past_key_values`` still works but warns on every call), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.no_grad()
def prompt_cache(base_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 backbone_inputs: dict[str, Any], position_ids: torch.Tensor | None = None):
    """Run the prompt through the base model without grad and return the backbone's cache object (a
    ``DynamicCache``) holding L positions per layer. Arguments as for :func:`prefix_cache_query_states`, plus
    ``position_ids``: the prompt's positions when SLQ computes them (M-RoPE with images), else None."""
    out = base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                     return_dict=True, **backbone_inputs)
    cache = getattr(out, cache_kwarg(type(base_model)), None)  # the output field has the argument's name
    if cache is None:
        raise RuntimeError(f"{type(base_model).__name__} returned no past_key_values with use_cache=True; use "
                           "SLQConfig(training_path='full') for this backbone.")
    return cache


def block_causal_mask(sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(Q, Q) bool mask, Q = sum(sizes): each query set causal within itself and blind to the other sets."""
    return torch.block_diag(*[torch.ones(n, n, dtype=torch.bool, device=device).tril() for n in sizes])


def query_offsets(sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(Q,) position offset of every query from the first query slot: ``arange(n)`` restarted for each set, so each
    set sits at exactly the positions it would take alone after the prompt."""
    return torch.cat([torch.arange(n, device=device) for n in sizes])


def _additive_mask(prompt_mask: torch.Tensor, query_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4-D additive mask (B, 1, Q, L + Q): rows may read every real prompt token and the queries ``query_mask``
    allows. Additive floats (0 / dtype min) work for both the eager and the sdpa attention functions."""
    batch, length = prompt_mask.shape
    num = query_mask.shape[0]
    allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(batch, num, length),
                         query_mask.to(prompt_mask.device).bool()[None].expand(batch, -1, -1)], dim=2)  # (B, Q, L+Q)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=prompt_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def prefix_cache_query_states(
    base_model: torch.nn.Module,
    spec: BackboneSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    queries: torch.Tensor,
    backbone_inputs: dict[str, Any],
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Final hidden states of the queries appended to a prompt, computed with the prefix cache.

    Args:
        base_model: the backbone's base model (``backbone.base_model``); frozen.
        spec: the backbone family's registry row (decides the position rule).
        input_ids: (B, L) LEFT-padded prompt ids, no query slots (``SLQModel`` re-lays rows before calling).
        attention_mask: (B, L) prompt mask.
        queries: (Q, H), shared by every row; fp32 parameters are cast to the backbone's dtype.
            Q = N_q for one query set, K*N_q for K sets.
        backbone_inputs: the prompt's other processor outputs (pixel_values, image_grid_thw, mm_token_type_ids
            (B, L), ...), already re-laid like the ids.
        sizes: N_q of each query set in ``queries`` (sum = Q); default one set. Several sets get
            :func:`query_offsets` positions and a :func:`block_causal_mask`, as a 4-D additive mask (backbones with
            sliding-window layers refuse it); one set keeps a 2-D mask and the backbone's own causal mask.

    Returns:
        (B, Q, H) final (post-norm) hidden states at the query positions, in the backbone's dtype, with grad to
        ``queries`` only.
    """
    batch, length = input_ids.shape
    dtype = base_model.get_input_embeddings().weight.dtype
    num = queries.shape[0]
    queries = queries.unsqueeze(0).expand(batch, -1, -1)  # (B, Q, H)
    sizes = [num] if sizes is None else list(sizes)
    if sum(sizes) != num:
        raise ValueError(f"sizes={sizes} add up to {sum(sizes)}, but {num} queries were given.")
    offsets = query_offsets(sizes, input_ids.device)
    # Positions first: they come from the ids and grids, and a missing input fails before the expensive pass.
    positions = query_position_ids(base_model, spec, input_ids, attention_mask, backbone_inputs, offsets=offsets)

    prompt_positions = sequence_position_ids(base_model, spec, input_ids, attention_mask, backbone_inputs)
    cache = prompt_cache(base_model, input_ids, attention_mask, backbone_inputs, prompt_positions)
    if len(sizes) == 1:
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, num)], dim=1)  # (B, L + Q)
    else:
        if any(getattr(cache, "is_sliding", ())):
            # A sliding-window layer keeps only its last window of prompt keys, so one (L + Q)-wide 4-D mask cannot
            # serve it; the backbone's own 2-D mask handling does (the default path), one query set per call.
            raise ValueError(f"Several query sets cannot share a prompt pass on {spec.family}: it has sliding-window "
                             "attention layers. Run one query set per call instead.")
        mask = _additive_mask(attention_mask, block_causal_mask(sizes, input_ids.device), dtype)  # (B, 1, Q, L + Q)
    out = base_model(inputs_embeds=queries.to(dtype), attention_mask=mask, position_ids=positions, use_cache=True,
                     return_dict=True, **{cache_kwarg(type(base_model)): cache})
    return out.last_hidden_state  # (B, Q, H)
