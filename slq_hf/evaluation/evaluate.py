"""End-to-end retrieval evaluation: encode a :class:`RetrievalDataset` with a model, score it, report."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import RetrievalDataset
from .encoding import Encoder, encode_inputs, model_fingerprint
from .metrics import (
    DEFAULT_KS,
    composed_retrieval_metrics,
    cosine_similarity_matrix,
    modality_gap,
    retrieval_metrics,
)
from .report import plot_modality_gap


def encode_dataset(
    model: Encoder,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    image_instruction: str | None = None,
    text_instruction: str | None = None,
    show_progress_bar: bool | None = None,
    stats: dict | None = None,
    encode_kwargs: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Embed every image, caption and composed query of ``dataset``.

    Returns:
        {"image": (I, D), "text": (T, D), "composed": (Q, D)} float32 CPU tensors ("text"/"composed" only when the
        dataset has them). ``stats`` (if a dict) receives per-part {"seconds", "cache"}. ``encode_kwargs`` go to
        every ``model.encode`` call (and into the cache key).
    """
    if cache_dir is not None and model_id is None and isinstance(model, torch.nn.Module):
        model_id = model_fingerprint(model)  # once, not once per part
    common = dict(batch_size=batch_size, cache_dir=cache_dir, model_id=model_id, show_progress_bar=show_progress_bar,
                  encode_kwargs=encode_kwargs)
    parts: dict[str, list] = {"image": list(dataset.images)}
    if dataset.texts:
        parts["text"] = list(dataset.texts)
    if dataset.composed:
        parts["composed"] = [{"image": dataset.images[q.reference], "text": q.text} for q in dataset.composed]
    instructions = {"image": image_instruction, "text": text_instruction, "composed": image_instruction}
    out = {}
    for part, inputs in parts.items():
        part_stats: dict = {}
        out[part] = encode_inputs(model, inputs, instruction=instructions[part], desc=f"{part}s",
                                  stats=part_stats, **common)
        if stats is not None:
            stats[part] = part_stats
    return out


def evaluate_embeddings(
    dataset: RetrievalDataset,
    image_embeddings,
    text_embeddings=None,
    composed_embeddings=None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Score precomputed embeddings against ``dataset``'s ground truth (no model needed).

    Args:
        image_embeddings: (I, D) in ``dataset.images`` order.
        text_embeddings: (T, D) in ``dataset.texts`` order (required when the dataset has captions).
        composed_embeddings: (Q, D) in ``dataset.composed`` order (required when it has composed queries).

    Returns:
        {"dataset": {...counts}, "metrics": {"i2t", "t2i", "i2t_dedup", "t2i_dedup", "composed"}, "modality_gap"}.
        Each metrics block is {"R@k" (fraction), "mean_rank", "median_rank" (1-based), "num_queries"}.
    """
    image_embeddings = torch.as_tensor(image_embeddings)
    if len(image_embeddings) != dataset.num_images:
        raise ValueError(f"{len(image_embeddings)} image embeddings for {dataset.num_images} images in "
                         f"{dataset.name}.")
    metrics: dict[str, Any] = {}
    gap = None
    if dataset.texts:
        if text_embeddings is None or len(text_embeddings) != len(dataset.texts):
            got = None if text_embeddings is None else len(text_embeddings)
            raise ValueError(f"{dataset.name} has {len(dataset.texts)} captions but {got} text embeddings.")
        metrics.update(retrieval_metrics(image_embeddings, text_embeddings, dataset.text_to_image, ks,
                                         texts=dataset.texts))
        gap = modality_gap(image_embeddings, text_embeddings)
    if dataset.composed:
        if composed_embeddings is None or len(composed_embeddings) != len(dataset.composed):
            got = None if composed_embeddings is None else len(composed_embeddings)
            raise ValueError(f"{dataset.name} has {len(dataset.composed)} composed queries but {got} embeddings.")
        metrics["composed"] = composed_retrieval_metrics(
            composed_embeddings, image_embeddings, [q.target for q in dataset.composed],
            [q.reference for q in dataset.composed], ks)
    return {
        "dataset": {"name": dataset.name, "split": dataset.split, "num_images": dataset.num_images,
                    "num_texts": len(dataset.texts), "num_composed": len(dataset.composed)},
        "metrics": metrics,
        "modality_gap": gap,
    }


def _check_rerank_request(model: Encoder, dataset: RetrievalDataset) -> None:
    """Before any encoding: reranking that cannot happen is an error, not a result without its "rerank" part."""
    if not dataset.texts:
        raise ValueError(f"rerank_top_k (--rerank-top-k) reranks image-text retrieval, but {dataset.name} has no "
                         "captions (composed queries are not reranked); drop the option.")
    if getattr(model, "backbone", None) is None or getattr(model, "processor", None) is None:
        raise ValueError(f"rerank_top_k (--rerank-top-k) needs the embedding model's own backbone and processor; a "
                         f"{type(model).__name__} has no .backbone/.processor. Evaluate an SLQModel.")


def evaluate_retrieval(
    model: Encoder,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 16,
    ks: Sequence[int] = DEFAULT_KS,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    gap_plot: str | os.PathLike | None = None,
    image_instruction: str | None = None,
    text_instruction: str | None = None,
    show_progress_bar: bool | None = None,
    return_embeddings: bool = False,
    encode_kwargs: dict[str, Any] | None = None,
    rerank_top_k: int | None = None,
    rerank_scorer: str = "likelihood",
    rerank_batch_size: int = 8,
    rerank_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode ``dataset`` with ``model`` and compute every retrieval metric it supports.

    Args:
        model: an ``SLQModel``, a ``SentenceTransformer``, anything with ``encode(inputs, batch_size=,
            show_progress_bar=)``, or a callable ``fn(inputs) -> (N, D)`` (see :mod:`slq_hf.evaluation.encoding`).
        dataset: from :func:`load_retrieval_dataset` or :meth:`RetrievalDataset.from_pairs`.
        batch_size: encode batch size.
        ks: recall cut-offs.
        cache_dir: reuse / store embeddings here (safetensors, keyed by model + data fingerprint).
        model_id: cache identity for models that cannot be fingerprinted (plain callables).
        gap_plot: write the modality-gap PCA figure (PNG) here (skipped when the dataset has no captions).
        image_instruction / text_instruction: forwarded as ``encode(..., instruction=)``.
        return_embeddings: add {"embeddings": {"image", "text", "composed"}} tensors to the result (not JSON-able;
            pop it before saving).
        encode_kwargs: more ``model.encode`` arguments (sentence-transformers: ``truncate_dim``, ...); cache-keyed.
        rerank_top_k: also rerank each query's top k with the model's own frozen backbone (SLQModel only) and report
            recall after it under ``result["rerank"]`` (see :func:`slq_hf.evaluation.reranking.
            rerank_retrieval_metrics`), both directions.
        rerank_scorer / rerank_batch_size / rerank_kwargs: the reranker's scorer (``"likelihood"`` or
            ``"yes_no"``), pairs per forward, and more ``rerank`` options (``prompt``, ``yes_no``).

    Returns:
        :func:`evaluate_embeddings`'s dict plus "encode": per-part {"seconds", "cache"} and "gap_plot" (path or
        None). Example: ``result["metrics"]["t2i"]["R@1"]`` is text→image Recall@1 as a fraction.
    """
    if not isinstance(dataset, RetrievalDataset):
        raise TypeError(f"dataset is a {type(dataset).__name__}; expected a RetrievalDataset from "
                        "load_retrieval_dataset(path) or RetrievalDataset.from_pairs(pairs).")
    if rerank_top_k is not None:
        _check_rerank_request(model, dataset)
    started = time.perf_counter()
    stats: dict = {}
    embeddings = encode_dataset(model, dataset, batch_size=batch_size, cache_dir=cache_dir, model_id=model_id,
                                image_instruction=image_instruction, text_instruction=text_instruction,
                                show_progress_bar=show_progress_bar, stats=stats, encode_kwargs=encode_kwargs)
    result = evaluate_embeddings(dataset, embeddings["image"], embeddings.get("text"), embeddings.get("composed"),
                                 ks)
    result["encode"] = stats
    result["gap_plot"] = None
    if gap_plot is not None and "text" in embeddings:
        result["gap_plot"] = str(plot_modality_gap(embeddings["image"], embeddings["text"], Path(gap_plot),
                                                   title=dataset.name))
    if rerank_top_k is not None:
        from .reranking import rerank_retrieval_metrics

        similarity = cosine_similarity_matrix(embeddings["image"], embeddings["text"])  # (I, T), as the metrics use
        result["rerank"] = rerank_retrieval_metrics(model, dataset, similarity, top_k=rerank_top_k,
                                                    scorer=rerank_scorer, ks=ks, batch_size=rerank_batch_size,
                                                    show_progress_bar=show_progress_bar, **(rerank_kwargs or {}))
    result["seconds"] = time.perf_counter() - started
    if return_embeddings:
        result["embeddings"] = embeddings
    return result
