"""Reports: Markdown tables, results JSON and the modality-gap figure."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..modeling.checkpoint import atomic_write

# Metric block -> row label, in table order.
DIRECTIONS: dict[str, str] = {
    "i2t": "image → text",
    "t2i": "text → image",
    "i2t_dedup": "image → text (duplicate captions = hits)",
    "t2i_dedup": "text → image (duplicate captions = hits)",
    "composed": "composed (image + text → image)",
}


def _recall_columns(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for block in blocks for k in block if k.startswith("R@"))
    return sorted(keys, key=lambda k: int(k[2:]))


def _metric_cells(block: Mapping[str, Any], recalls: Sequence[str]) -> list[str]:
    """A block's recall (percent), rank and query-count cells; a metric the block lacks (other ``ks``, a results
    file written by hand) prints as "–"."""
    def cell(key: str, spec: str, scale: float = 1) -> str:
        return "–" if block.get(key) is None else f"{scale * block[key]:{spec}}"

    return [*[cell(k, ".1f", 100) for k in recalls], cell("mean_rank", ".1f"), cell("median_rank", ".0f"),
            str(block.get("num_queries", ""))]


def format_results_table(results: Mapping[str, Any]) -> str:
    """Markdown table of one :func:`evaluate_retrieval` result: one row per direction, recall in percent (a missing
    metric as "–"); with ``rerank_top_k``, one more row per reranked direction (after reranking) below the
    embedding-only rows."""
    metrics = results["metrics"]
    rows = [(label, metrics[key]) for key, label in DIRECTIONS.items() if key in metrics]
    recalls = _recall_columns([block for _, block in rows])
    header = ["direction", *[f"{k} %" for k in recalls], "mean rank", "median rank", "queries"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, block in rows:
        lines.append("| " + " | ".join([label, *_metric_cells(block, recalls)]) + " |")
    rerank = results.get("rerank")
    if rerank:
        label = f"reranked top-{rerank['top_k']} ({rerank['scorer']})"
        for key, name in DIRECTIONS.items():
            block = rerank["metrics"].get(key)
            if block is not None:
                lines.append("| " + " | ".join([f"{name}, {label}", *_metric_cells(block, recalls)]) + " |")
    data = results.get("dataset", {})
    notes = [f"{data.get('name', 'dataset')}: {data.get('num_images', '?')} images, "
             f"{data.get('num_texts', '?')} texts" + (f", {data['num_composed']} composed queries"
                                                     if data.get("num_composed") else "")]
    if rerank:
        cost = ", ".join(f"{d} {1000 * s:.0f} ms" for d, s in rerank.get("seconds_per_query", {}).items())
        notes.append(f"rerank with the frozen backbone: {rerank['num_queries']} queries, {rerank['seconds']:.1f} s "
                     f"({cost} per query)")
    if results.get("modality_gap") is not None:
        notes.append(f"modality gap ||mean(img) - mean(txt)|| = {results['modality_gap']:.3f}")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def format_comparison_table(results_by_name: Mapping[str, Mapping[str, Any]],
                            columns: Sequence[str] = ("t2i/R@1", "i2t/R@1", "t2i/R@5", "i2t/R@5"),
                            percent: bool = True) -> str:
    """Markdown table comparing several results (rows) on chosen ``"block/metric"`` columns.

    ``results_by_name`` maps a row label to an :func:`evaluate_retrieval` result or its ``"metrics"`` dict;
    a missing metric prints as "–".
    """
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "|".join("---" for _ in columns) + "|"]
    for name, result in results_by_name.items():
        metrics = result.get("metrics", result)
        cells = []
        for column in columns:
            block, _, metric = column.partition("/")
            value = metrics.get(block, {}).get(metric)
            scale = 100 if percent and metric.startswith("R@") else 1
            cells.append("–" if value is None else f"{scale * value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_results_json(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write results as indented JSON (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def pca_2d(points: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2) projection on the two leading principal axes (centred SVD; signs fixed for stability)."""
    centred = points.double() - points.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]  # (2, D)
    # SVD signs are arbitrary; make the largest-magnitude loading positive so reruns draw the same picture.
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    coords = centred @ (axes * signs).T
    if coords.shape[1] < 2:  # a single embedding dimension: pad so the plot still has two axes
        coords = torch.cat([coords, torch.zeros(len(coords), 2 - coords.shape[1], dtype=coords.dtype)], 1)
    return coords


def plot_modality_gap(image_embeddings, text_embeddings, path: str | os.PathLike, title: str | None = None,
                      max_points: int = 2000) -> Path:
    """PCA scatter of image vs text embeddings (PNG, Agg backend) with both centroids and the gap norm.

    Args:
        image_embeddings: (I, D); text_embeddings: (T, D). Both are L2-normalised before the PCA.
        max_points: per modality, an evenly spaced subsample keeps large sets readable.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("The modality-gap plot needs matplotlib: pip install 'slq_hf[evaluation]'.") from err
    from .metrics import modality_gap

    img = torch.nn.functional.normalize(torch.as_tensor(image_embeddings).double(), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_embeddings).double(), dim=-1)
    gap = modality_gap(img, txt)

    def subsample(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) <= max_points else x[torch.linspace(0, len(x) - 1, max_points).long()]

    img_s, txt_s = subsample(img), subsample(txt)
    # PCA on both modalities together (plus the centroids), so the axes show the gap if it dominates.
    coords = pca_2d(torch.cat([img_s, txt_s, img.mean(0, keepdim=True), txt.mean(0, keepdim=True)]))
    ci, ct = coords[: len(img_s)], coords[len(img_s) : len(img_s) + len(txt_s)]
    mi, mt = coords[-2], coords[-1]

    # Figure + Agg canvas directly (no pyplot): no global backend switch, safe in servers and threads.
    fig = Figure(figsize=(6, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(ci[:, 0], ci[:, 1], s=8, alpha=0.6, c="tab:blue", label=f"images ({len(img)})")
    ax.scatter(ct[:, 0], ct[:, 1], s=8, alpha=0.6, c="tab:orange", label=f"texts ({len(txt)})")
    ax.scatter([mi[0]], [mi[1]], marker="X", s=120, c="navy", edgecolors="white", label="image centroid")
    ax.scatter([mt[0]], [mt[1]], marker="X", s=120, c="darkred", edgecolors="white", label="text centroid")
    ax.annotate("", xy=(mt[0].item(), mt[1].item()), xytext=(mi[0].item(), mi[1].item()),
                arrowprops={"arrowstyle": "->", "color": "black"})
    ax.set_title((title + "\n" if title else "") + f"modality gap ||mean(img) - mean(txt)|| = {gap:.3f}",
                 fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
