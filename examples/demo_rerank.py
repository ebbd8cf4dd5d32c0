"""Retrieve with SLQ, rerank the top k with the same frozen backbone, on the toy backbone's held-out scenes.

SLQ never changes the backbone, so the loaded model still captions images. ``rerank_rows`` takes SLQ's top 10 for
every query and re-orders them by the backbone's own score of each (image, text) pair (``likelihood``: mean
log-probability of the text as the answer to the image), for explicit captions ("a red triangle in the top left")
and knowledge captions ("the shape with three corners and the colour of blood in the top left").

    .venv/bin/python examples/demo_rerank.py [--model outputs/demo/slq-toy] [--top-k 10] [--out outputs/rerank]

Without ``--model`` (or when the folder does not exist) it first trains SLQ on the toy backbone with the demo's
recipe (8 queries, 1000 steps x 32 fresh pairs, lr 3e-2 cosine; about 3 minutes on 2 cores) and saves it there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from slq_hf import SLQModel
from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval
from slq_hf.testing.toy_scenes import TRAIN_SEED, Scene, combinations, heldout_scenes, scene_for

TOY_BACKBONE = Path(__file__).resolve().parent / "toy" / "backbone"
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


# ------------------------------------------------------------------------------------------------------ training
def train_toy_slq(out: Path, steps: int = 1000, batch_size: int = 32, num_queries: int = 8, lr: float = 3e-2,
                  warmup: int = 10, seed: int = TRAIN_SEED) -> SLQModel:
    """The demo's SLQ recipe with the public API (SLQModel + SLQDataCollator + a plain AdamW loop); saves to ``out``.

    Only the queries and the temperature train; each batch holds ``batch_size`` distinct combinations, every image
    freshly drawn, explicit captions only (knowledge captions are never seen in training).
    """
    from slq_hf.training import SLQDataCollator

    torch.manual_seed(seed)
    model = SLQModel.from_backbone(str(TOY_BACKBONE), num_queries=num_queries, dtype=torch.float32)
    collator = SLQDataCollator(model.processor, strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        scenes = [scene_for(c, rng) for c in rng.sample(combinations(), batch_size)]
        loss = model(**collator([{"image": s.image, "text": s.caption} for s in scenes])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0:
            print(f"   step {step + 1}/{steps} loss {loss.item():.3f} {time.perf_counter() - started:.0f}s",
                  flush=True)
    model.eval()
    model.save_pretrained(out)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/rerank/slq-toy",
                        help="SLQ folder on the toy backbone; trained there first if missing")
    parser.add_argument("--top-k", type=int, default=10, help="SLQ candidates reranked per query")
    parser.add_argument("--scorers", nargs="+", default=["likelihood"], choices=["likelihood", "yes_no"],
                        help="rerank scorers to compare (the toy vocabulary has no 'yes': yes_no needs a real "
                             "instruction-tuned backbone)")
    parser.add_argument("--steps", type=int, default=1000, help="SLQ training steps when a folder must be trained")
    parser.add_argument("--out", default="outputs/rerank", help="where results.json goes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    if (folder / "config.json").is_file():
        model = SLQModel.from_pretrained(folder, dtype=torch.float32)
    else:
        print(f"Training SLQ on the toy backbone ({args.steps} steps) -> {folder}", flush=True)
        model = train_toy_slq(folder, steps=args.steps)
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
