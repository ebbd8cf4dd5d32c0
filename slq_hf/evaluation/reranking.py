"""Recall after reranking the embedding's top k with the frozen backbone (``slq_hf.modeling.reranking``).

For every query the first stage's top ``k`` candidates are re-ordered by the backbone's pair score; everything below
rank k keeps its place. The re-ordered list is written back as a similarity matrix (the top k lifted above all
other candidates, ordered by their rerank score), so the same metric code, tie rule and duplicate-caption variants
apply before and after.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..modeling.reranking import rerank
from .data import RetrievalDataset
from .metrics import DEFAULT_KS, _positives_from_assignment, duplicate_positives, image_text_retrieval_metrics

DIRECTIONS = ("t2i", "i2t")


def rerank_similarity(similarity: torch.Tensor, top_k: int, score: Callable[[int, list[int]], torch.Tensor],
                      rows: Sequence[int] | None = None, desc: str = "rerank",
                      show_progress_bar: bool | None = None, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Re-order each row's top ``top_k`` candidates by ``score(row, candidate_indices) -> (k,) scores``.

    Args:
        similarity: (Q, C) first-stage scores, higher = better.
        top_k: candidates reranked per row (capped at C).
        score: the second-stage scorer for one query row and its candidates.
        rows: the rows to rerank (default all); the others are returned unchanged.
        positives: optional (Q, C) bool or int, > 0 where the candidate is a correct answer (higher: correct under
            more of the metrics). Of the candidates tied at the k-th score, the correct ones enter the top k last,
            so ties count against the query as in the metrics; without it, torch.topk picks among them.

    Returns:
        (Q, C) float64: reranked rows hold their top k above every other candidate, in rerank-score order (equal
        rerank scores stay tied), the rest unchanged.
    """
    from tqdm.auto import tqdm

    out = similarity.double().clone()
    k = min(top_k, out.shape[1])
    rows = range(out.shape[0]) if rows is None else rows
    disable = None if show_progress_bar is None else not show_progress_bar
    for row in tqdm(rows, desc=desc, unit="query", disable=disable):
        if positives is None:
            top = torch.topk(out[row], k).indices  # (k,)
        else:  # stable sorts: by correctness, then by score, so a tie keeps wrong answers first
            by_level = torch.argsort(torch.as_tensor(positives[row]).to(torch.int64), stable=True)  # (C,)
            top = by_level[torch.argsort(out[row][by_level], descending=True, stable=True)[:k]]
        scores = torch.as_tensor(score(row, top.tolist()), dtype=torch.float64)  # (k,)
        # Lift the top k above the row's best first-stage score; their order is the rerank scores' order.
        out[row, top] = out[row].max() + 1.0 + (scores - scores.min())
    return out


def _image_loader(dataset: RetrievalDataset, capacity: int = 256) -> Callable[[int], Any]:
    """Index -> loaded image, keeping the last ``capacity`` images (text queries revisit the same top images)."""
    from .encoding import _open

    cache: OrderedDict[int, Any] = OrderedDict()

    def load(index: int):
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        image = _open(dataset.images[index])
        cache[index] = image
        if len(cache) > capacity:
            cache.popitem(last=False)
        return image

    return load


def rerank_retrieval_metrics(
    model: Any,
    dataset: RetrievalDataset,
    similarity: torch.Tensor,
    *,
    top_k: int,
    scorer: str = "likelihood",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 8,
    directions: Sequence[str] = DIRECTIONS,
    show_progress_bar: bool | None = None,
    **rerank_kwargs,
) -> dict[str, Any]:
    """Image-text recall after reranking the top ``top_k`` of ``similarity`` with ``model``'s backbone.

    Args:
        model: an ``SLQModel`` (or anything with ``.backbone`` and ``.processor``).
        dataset: the dataset ``similarity`` was computed on.
        similarity: (I, T) first-stage image-to-text scores.
        top_k: candidates reranked per query.
        scorer: ``"likelihood"`` or ``"yes_no"``.
        directions: ``"t2i"`` (each caption reranks its top images) and/or ``"i2t"`` (each captioned image reranks
            its top captions, with the image prefix computed once).
        **rerank_kwargs: passed to :func:`slq_hf.modeling.reranking.rerank` (``prompt``, ``yes_no``, ...).

    Returns:
        {"top_k", "scorer", "metrics": {"t2i", "t2i_dedup", "i2t", "i2t_dedup"} (as ``retrieval_metrics``),
         "seconds": rerank seconds, "num_queries": queries reranked, "seconds_per_query": {direction: s}}.
    """
    backbone, processor = getattr(model, "backbone", None), getattr(model, "processor", None)
    if backbone is None or processor is None:
        raise ValueError(f"Reranking needs the embedding model's own backbone and processor; a "
                         f"{type(model).__name__} has no .backbone/.processor. Evaluate an SLQModel.")
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"Unknown rerank directions {sorted(unknown)}; choose from {list(DIRECTIONS)}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"rerank top_k={top_k!r} is invalid; expected a positive integer.")
    sim = torch.as_tensor(similarity).double()  # (I, T)
    texts, owner = dataset.texts, torch.as_tensor(dataset.text_to_image)
    image = _image_loader(dataset)
    # (T, I): 2 where the image owns the caption, 1 where it owns only an equal caption (the dedup metrics' hit).
    levels = (_positives_from_assignment(owner, sim.shape[0]).to(torch.uint8)  # uint8: COCO's is 25k x 5k
              + duplicate_positives(owner, texts, sim.shape[0]).to(torch.uint8))
    options = dict(scorer=scorer, batch_size=batch_size, show_progress_bar=False, **rerank_kwargs)
    if options.get("rewrite") is not None:
        options.setdefault("rewrite_cache", {})  # each caption is rewritten once for the whole evaluation
    metrics: dict[str, Any] = {}
    per_query: dict[str, float] = {}
    total, count = 0.0, 0
    for direction in directions:
        started = time.perf_counter()
        if direction == "t2i":
            def score(row: int, top: list[int]) -> torch.Tensor:
                return rerank(backbone, processor, {"text": texts[row]}, [image(i) for i in top], **options).scores

            reranked = rerank_similarity(sim.T, top_k, score, desc="rerank text->image",
                                         show_progress_bar=show_progress_bar, positives=levels).T
            rows = len(texts)
        else:
            def score(row: int, top: list[int]) -> torch.Tensor:
                return rerank(backbone, processor, image(row), [{"text": texts[t]} for t in top], **options).scores

            captioned = sorted(set(owner.tolist()))  # images without captions are no image->text queries
            reranked = rerank_similarity(sim, top_k, score, rows=captioned, desc="rerank image->text",
                                         show_progress_bar=show_progress_bar, positives=levels.T)
            rows = len(captioned)
        seconds = time.perf_counter() - started
        result = image_text_retrieval_metrics(reranked, owner, ks, texts=texts)
        metrics.update({key: value for key, value in result.items() if key.startswith(direction)})
        per_query[direction] = seconds / max(1, rows)
        total, count = total + seconds, count + rows
    return {"top_k": top_k, "scorer": scorer, "metrics": metrics, "seconds": total, "num_queries": count,
            "seconds_per_query": per_query}
