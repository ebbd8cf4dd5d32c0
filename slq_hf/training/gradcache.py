"""GradCache: a contrastive batch larger than memory, with the exact gradient of the whole batch.

In-batch negatives make the loss of every pair depend on every other pair, so gradient accumulation does not
enlarge the contrastive batch: each accumulated chunk would see only its own negatives. GradCache (Gao et al.
2021; VLM2Vec ``--grad_cache``, sentence-transformers' ``CachedMultipleNegativesRankingLoss``) keeps the whole
batch in the loss at the memory cost of one micro-batch:

1. embed every micro-batch WITHOUT gradients (no activations kept) and concatenate: the whole batch's embeddings;
2. compute the loss on the full similarity matrix (negatives gathered across ranks as usual) and its gradient with
   respect to the embeddings and the temperature;
3. re-run each micro-batch WITH gradients and backpropagate ``sum(embeddings * cached gradient)``, whose gradient
   with respect to the queries is exactly that micro-batch's share of d(loss)/d(queries).

The price is a second forward of every micro-batch. The random state is replayed in step 3 (dropout in a trainable
head would otherwise differ between the two passes; a frozen backbone runs in eval mode and draws nothing).

The micro-batches are built by :class:`~slq_hf.training.SLQDataCollator` (``micro_batch_size=``): each is a
complete pair batch of its own examples (query, positive and hard-negative sides), so images are never split
from their patch rows. Embeddings come from the model's public forward (``pooler_output``), the loss from
:func:`slq_hf.modeling.losses.symmetric_infonce`, so every training path of the model (prefix cache or full,
several query sets) is used unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..modeling.losses import distributed_world_size, symmetric_infonce
from ..modeling.modeling_slq import MAX_LOGIT_SCALE
from .collator import MICRO_BATCHES_KEY

__all__ = ["MICRO_BATCHES_KEY", "contrastive_loss", "embed_side", "gradcache_backward", "side_inputs"]
SIDES = ("query", "positive", "negative")


def side_inputs(batch: dict[str, Any], side: str) -> dict[str, Any] | None:
    """The processor inputs of one side of a pair batch, prefixes removed; None when the batch has no such side."""
    if side == "query":
        return {k: v for k, v in batch.items() if not k.startswith(("positive_", "negative_"))}
    prefix = f"{side}_"
    values = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    return values or None


def embed_side(model: torch.nn.Module, inputs: dict[str, Any], query_sets: Sequence[str] | None
               ) -> dict[str, torch.Tensor]:
    """Embeddings of one side through the model's public forward: {set name: (n, D)}; one entry ("") without
    several query sets."""
    if query_sets:
        return dict(model(**inputs, query_sets=list(query_sets), return_loss=False).pooler_outputs)
    return {"": model(**inputs, return_loss=False).pooler_output}


@contextmanager
def replay_random_state(state: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Record the RNG state (``state`` None) or restore a recorded one, so a re-run draws the same numbers."""
    if state is None:
        state = {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}
    else:
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["cuda"])
    yield state


def contrastive_loss(embeddings: dict[str, dict[str, torch.Tensor]], logit_scale: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """The model's loss on whole-batch embeddings: symmetric InfoNCE per query set, averaged over sets.

    Args:
        embeddings: side -> set name -> (n_side, D) embeddings of the whole local batch.
        logit_scale: () the model's log(1 / temperature).

    Returns:
        (loss (), accuracy ()) of the global batch (negatives gathered across ranks).
    """
    losses, accuracies = [], []
    for name, query in embeddings["query"].items():
        negative = embeddings["negative"][name] if "negative" in embeddings else None
        result = symmetric_infonce(query, embeddings["positive"][name], logit_scale, negative,
                                   max_logit_scale=MAX_LOGIT_SCALE)
        losses.append(result.loss)
        accuracies.append(result.accuracy)
    return torch.stack(losses).mean(), torch.stack(accuracies).mean()


def gradcache_backward(model: torch.nn.Module, micro_batches: list[dict[str, Any]], scale: float = 1.0,
                       average_across_ranks: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of the whole batch's contrastive loss, one micro-batch in memory.

    Args:
        model: the (unwrapped) SLQModel.
        micro_batches: pair batches (``SLQDataCollator`` output), together the local contrastive batch.
        scale: multiply the gradients by this (``1 / gradient_accumulation_steps``).
        average_across_ranks: under torch.distributed, all-reduce (average) the trainable parameters' gradients
            here, as DDP would: the re-runs go around the DDP wrapper, whose hooks then stay idle.

    Returns:
        (loss (), accuracy ()) of the global batch, detached.
    """
    query_sets = list(getattr(model, "joint_query_sets", None) or []) or None
    sides = [s for s in SIDES if all(side_inputs(b, s) is not None for b in micro_batches)]
    if any(side_inputs(b, "negative") is not None for b in micro_batches) and "negative" not in sides:
        sides.append("negative")  # only some micro-batches have hard negatives: the others add none
    # 1. Embed everything without gradients, remembering each micro-batch's random state.
    states, parts = [], {side: [] for side in sides}  # side -> per micro-batch {set: (n, D)}
    with torch.no_grad():
        for batch in micro_batches:
            with replay_random_state(None) as state:
                states.append(state)
                for side in sides:
                    inputs = side_inputs(batch, side)
                    parts[side].append(embed_side(model, inputs, query_sets) if inputs is not None else None)
    names = next(p for p in parts["query"] if p is not None).keys()
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    leaves: list[torch.Tensor] = []
    for side in sides:
        embeddings[side] = {}
        for name in names:
            rows = [p[name] for p in parts[side] if p is not None]
            embeddings[side][name] = torch.cat(rows).detach().requires_grad_(True)
            leaves.append(embeddings[side][name])
    # 2. Loss on the full similarity matrix; gradients w.r.t. the embeddings and the temperature.
    logit_scale = model.logit_scale
    with torch.enable_grad():
        loss, accuracy = contrastive_loss(embeddings, logit_scale)
        wrt = [*leaves, logit_scale] if logit_scale.requires_grad else leaves
        grads = torch.autograd.grad(loss * scale, wrt)
    cached = dict(zip((id(t) for t in leaves), grads))
    if logit_scale.requires_grad:
        logit_scale.grad = grads[-1] if logit_scale.grad is None else logit_scale.grad + grads[-1]
    # 3. Re-run each micro-batch with gradients; backpropagate its rows of the cached gradient.
    offsets = {(side, name): 0 for side in sides for name in names}
    for batch, state in zip(micro_batches, states):
        with replay_random_state(state):
            surrogate = None
            for side in sides:
                inputs = side_inputs(batch, side)
                if inputs is None:
                    continue
                for name, emb in embed_side(model, inputs, query_sets).items():
                    start = offsets[(side, name)]
                    grad = cached[id(embeddings[side][name])][start : start + emb.shape[0]]
                    offsets[(side, name)] = start + emb.shape[0]
                    term = (emb * grad).sum()
                    surrogate = term if surrogate is None else surrogate + term
            surrogate.backward()
    if average_across_ranks and distributed_world_size() > 1:
        _average_gradients(model)
    return loss.detach(), accuracy.detach()


def _average_gradients(model: torch.nn.Module) -> None:
    """All-reduce the trainable parameters' gradients (mean over ranks), as DDP does after a backward.

    Each rank's gradient already includes the other ranks' rows through the all-gather of the loss (scaled by the
    world size), so the mean is the gradient of the global loss, as in the plain DDP path."""
    world = distributed_world_size()
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)
