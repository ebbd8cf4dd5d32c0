"""Contrastive loss of SLQ training: symmetric InfoNCE with a learnable temperature, negatives gathered across devices.

Ships inside every saved checkpoint (remote code): imports only torch.

Under ``torch.distributed`` (world size > 1) every rank all-gathers the embeddings of all ranks WITH gradient and
computes the loss of the GLOBAL batch. Each rank then returns the same loss value (the single-process loss on the
concatenated batch), and the gradient that reaches a rank's own embeddings is ``world_size`` times the global
gradient (the all-gather backward sums the contributions of all ranks); DDP's gradient averaging divides that back,
so parameter gradients equal the single-process gradients on the concatenated batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch.distributed.nn.functional.all_gather is the stable all-gather with a backward pass (it sums the gradients of
# all ranks into the local rows); its deprecation notice points at a private API. One narrow filter, added once:
# catch_warnings() per call is not thread-safe and resets Python's "shown once" registry for every other warning.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


@dataclass
class ContrastiveOutput:
    """Result of :func:`symmetric_infonce`.

    Attributes:
        loss: () mean of the two cross-entropies (query -> candidates, positive -> queries) over the global batch.
        accuracy: () fraction of argmax hits over both directions of the global batch (no gradient).
        logits: (G, G + M) query -> [positives; negatives] logits of the global batch (temperature applied).
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    logits: torch.Tensor


def distributed_world_size() -> int:
    """World size when ``torch.distributed`` is initialised, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather a few (n_i, D) tensors from every rank, keeping the autograd graph.

    Row counts may differ between ranks (a batch that lost corrupt examples, an uneven last batch): counts are
    exchanged first, every tensor is zero-padded to the largest count, gathered, and the padding is cut off again.

    Args:
        tensors: list of (n_i, D) tensors; every rank must pass the same number of tensors with the same D.

    Returns:
        list of (sum over ranks of n_i, D) tensors, rows ordered by rank. Unchanged when not distributed.
    """
    world = distributed_world_size()
    if world == 1:
        return list(tensors)
    device = tensors[0].device
    counts = torch.tensor([t.shape[0] for t in tensors], device=device, dtype=torch.long)  # (T,)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    table = torch.stack(all_counts).tolist()  # world x T row counts
    gathered = []
    for index, tensor in enumerate(tensors):
        per_rank = [row[index] for row in table]
        longest = max(per_rank)
        if longest == 0:
            gathered.append(tensor)  # nobody has rows: nothing to exchange
            continue
        padded = F.pad(tensor, (0, 0, 0, longest - tensor.shape[0]))  # (longest, D)
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, per_rank)], dim=0))
    return gathered


def symmetric_infonce(
    query: torch.Tensor,
    positive: torch.Tensor,
    logit_scale: torch.Tensor,
    negative: torch.Tensor | None = None,
    max_logit_scale: float | None = None,
    gather: bool = True,
) -> ContrastiveOutput:
    """Symmetric InfoNCE (CLIP loss) between paired embeddings, with optional hard negatives.

    ``logits = exp(min(logit_scale, max_logit_scale)) * query @ candidates.T`` (cosine / temperature for normalised
    inputs). Row i of ``query`` must match row i of ``positive``. Query -> candidates uses the global positives and
    the global hard negatives as candidates; positive -> query uses the global queries. The loss is the mean of
    both cross-entropies over the global batch.

    Args:
        query: (B, D) query-side embeddings (normally L2-normalised).
        positive: (B, D) positive-side embeddings, row-aligned with ``query``.
        logit_scale: () log(1 / temperature), learnable.
        negative: optional (M, D) hard negatives (any M, also 0); extra candidates for the query -> positive side.
        max_logit_scale: clamp ``logit_scale`` at this value (CLIP: log(100)) so the temperature cannot collapse.
        gather: all-gather across ranks when ``torch.distributed`` runs with world size > 1.

    Returns:
        ContrastiveOutput(loss (), accuracy (), logits (G, G + M)).
    """
    if query.ndim != 2 or positive.shape != query.shape:
        raise ValueError(f"symmetric_infonce: query {tuple(query.shape)} and positive {tuple(positive.shape)} must be "
                         "two (batch, dim) tensors of the same shape, one row per pair.")
    if negative is not None and (negative.ndim != 2 or negative.shape[1] != query.shape[1]):
        raise ValueError(f"symmetric_infonce: negative has shape {tuple(negative.shape)}; expected (M, "
                         f"{query.shape[1]}).")
    distributed = gather and distributed_world_size() > 1
    if distributed:
        # Every rank must join the same collectives, so an absent negative side is gathered as 0 rows.
        if negative is None:
            negative = query.new_zeros((0, query.shape[1]))
        query, positive, negative = gather_with_grad([query, positive, negative])
    # fp32 even under autocast: logits reach 100 x cosine, where bf16 would round them by ~0.5.
    with torch.autocast(device_type=query.device.type, enabled=False):
        query, positive = query.float(), positive.float()
        scale = logit_scale.float()
        scale = (scale.clamp(max=max_logit_scale) if max_logit_scale is not None else scale).exp()
        candidates = positive if negative is None else torch.cat([positive, negative.float()])
        logits = scale * query @ candidates.T  # (G, G + M)
        logits_back = scale * positive @ query.T  # (G, G)
        labels = torch.arange(query.shape[0], device=query.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits_back, labels)) / 2
    with torch.no_grad():
        hits = (logits.argmax(dim=1) == labels).float().sum() + (logits_back.argmax(dim=1) == labels).float().sum()
        accuracy = hits / (2 * labels.numel())
    return ContrastiveOutput(loss=loss, accuracy=accuracy, logits=logits)
