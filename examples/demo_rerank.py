"""Retrieve with SLQ, rerank the top k with the same frozen backbone, on the toy backbone's held-out scenes.

SLQ never changes the backbone, so the loaded model still captions images. ``rerank_rows`` takes SLQ's top 10 for
every query and re-orders them by the backbone's own score of each (image, text) pair (``likelihood``: mean
log-probability of the text as the answer to the image), for explicit captions ("a red triangle in the top left")
and knowledge captions ("the shape with three corners and the colour of blood in the top left").

    .venv/bin/python examples/demo_rerank.py [--model outputs/demo/slq-toy] [--top-k 10] [--out outputs/rerank]

``--model`` is an SLQ folder trained on the toy backbone: ``make demo`` writes one with ``slq-hf train``
(``outputs/demo/slq-toy``), and ``make demo`` itself runs :func:`rerank_rows` as its step 7.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from slq_hf import SLQModel
from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval
from slq_hf.testing.toy_scenes import Scene, heldout_scenes

PARTS = {"caption": "explicit captions", "knowledge": "knowledge captions"}


def toy_datasets(scenes: list[Scene]) -> dict[str, RetrievalDataset]:
    """The held-out scenes twice: with explicit captions and with knowledge captions."""
    images = [s.image for s in scenes]
    return {
        "caption": RetrievalDataset.from_pairs(images, [s.caption for s in scenes], name="toy held-out, captions"),
        "knowledge": RetrievalDataset.from_pairs(images, [s.knowledge_caption for s in scenes],
                                                 name="toy held-out, knowledge captions"),
    }


# The toy backbone learned to rewrite a knowledge caption (alone, or followed by "describe") into the explicit
# caption; a chat backbone would get an instruction such as "Describe in one plain sentence the picture that this
# text is about: {text}".
TOY_REWRITE = "{text}"


def rerank_rows(slq_model: SLQModel, scenes: list[Scene], top_k: int = 10, scorers: tuple[str, ...] = ("likelihood",),
                batch_size: int = 16, rewrite: str | None = TOY_REWRITE) -> dict[str, dict[str, Any]]:
    """R@1 (%) of SLQ alone and of SLQ + backbone reranking of its top ``top_k``, both directions, both caption kinds.

    One row per scorer, plus (with ``rewrite``) one per scorer where the backbone first rewrites each text with
    that template and the rewrite is scored: how knowledge captions get reranked by a backbone that would never
    write them as captions itself.

    Returns:
        {"SLQ": {"caption t2i": ..., "caption i2t": ..., "knowledge t2i": ..., "knowledge i2t": ...},
         "SLQ + rerank top-10 (likelihood)": {..., "ms per query": rerank time per query}, ...}: rows for the demo's
        table (same keys as its ``recall_row``).
    """
    variants = {f"SLQ + rerank top-{top_k} ({scorer})": (scorer, None) for scorer in scorers}
    if rewrite is not None:
        variants.update({f"SLQ + rerank top-{top_k} ({scorer}, backbone rewrites the text first)": (scorer, rewrite)
                         for scorer in scorers})
    ceiling = f"SLQ R@{top_k} (the most reranking its top {top_k} can reach)"
    rows: dict[str, dict[str, Any]] = {"SLQ": {}, ceiling: {}}
    rows.update({name: {"seconds": 0.0, "queries": 0} for name in variants})
    for part, data in toy_datasets(scenes).items():
        for name, (scorer, template) in variants.items():
            result = evaluate_retrieval(slq_model, data, batch_size=64, ks=sorted({1, top_k}), show_progress_bar=False,
                                        rerank_top_k=top_k,
                                        rerank_scorer=scorer, rerank_batch_size=batch_size,
                                        rerank_kwargs={"rewrite": template})
            row = rows[name]
            for direction in ("t2i", "i2t"):
                rows["SLQ"][f"{part} {direction}"] = 100 * result["metrics"][direction]["R@1"]
                rows[ceiling][f"{part} {direction}"] = 100 * result["metrics"][direction][f"R@{top_k}"]
                row[f"{part} {direction}"] = 100 * result["rerank"]["metrics"][direction]["R@1"]
            row["seconds"] += result["rerank"]["seconds"]
            row["queries"] += result["rerank"]["num_queries"]
    for name, row in rows.items():
        if name in variants:
            row["ms per query"] = 1000 * row.pop("seconds") / max(1, row.pop("queries"))
    return rows


def format_rows(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`rerank_rows`."""
    columns = [f"{part} {direction}" for part in PARTS for direction in ("t2i", "i2t")]
    lines = ["| method (R@1 %) | " + " | ".join(columns) + " | rerank ms / query |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, row in rows.items():
        cost = f"{row['ms per query']:.0f}" if "ms per query" in row else "–"
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + f" | {cost} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/slq-toy",
                        help="SLQ folder on the toy backbone (make demo writes outputs/demo/slq-toy)")
    parser.add_argument("--top-k", type=int, default=10, help="SLQ candidates reranked per query")
    parser.add_argument("--scorers", nargs="+", default=["likelihood"], choices=["likelihood", "yes_no"],
                        help="rerank scorers to compare (the toy vocabulary has no 'yes': yes_no needs a real "
                             "instruction-tuned backbone)")
    parser.add_argument("--out", default="outputs/rerank", help="where results.json goes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        parser.error(f"--model {folder}: no SLQ folder there; run `make demo` first (it trains one with slq-hf train)")
    model = SLQModel.from_pretrained(folder, dtype=torch.float32)
    scenes = heldout_scenes()
    print(f"Reranking SLQ's top {args.top_k} on {len(scenes)} held-out scenes ...", flush=True)
    rows = rerank_rows(model, scenes, top_k=args.top_k, scorers=tuple(args.scorers))
    table = format_rows(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "table": table, "model": str(folder),
                                                  "top_k": args.top_k}, indent=2) + "\n")


if __name__ == "__main__":
    main()
