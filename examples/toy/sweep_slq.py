"""What moves SLQ on the toy backbone: one-factor sweeps around the demo's settings (the BENCHMARKS.md "toy" notes).

Each row trains SLQ queries with `slq-hf train` (or, with ``lora``, the LoRA baseline) with the demo's code, corpus
and seeds, changing one setting from the demo's defaults, and reports R@1 on the 150 held-out scenes.

    .venv/bin/python examples/toy/sweep_slq.py                         # the default sweep, ~20 minutes on 2 cores
    .venv/bin/python examples/toy/sweep_slq.py num_queries=16 query_init=vocab slq_lr=3e-2
    .venv/bin/python examples/toy/sweep_slq.py lora lora_lr=3e-3

A row is ``key=value`` settings separated by commas (``num_queries=16,steps=600``); ``default`` is the demo's own
configuration. Results are appended to ``outputs/toy_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1]
# The demo's recipe over three data seeds, then the factors that moved it most (BENCHMARKS.md lists every row's
# settings, so any other row can be re-run by passing it).
DEFAULT_SWEEP = [
    "default", "seed=1", "seed=2", "steps=300,slq_lr=1e-2", "steps=300", "num_queries=16,steps=700",
    "num_queries=16,steps=700,seed=1", "num_queries=16,steps=700,seed=2", "query_init=vocab,steps=700",
    "lora", "lora,lora_lr=1e-2,steps=700",
]


def load_demo():
    """examples/demo.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("slq_demo", EXAMPLES / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["slq_demo"] = module
    spec.loader.exec_module(module)
    return module


def parse_row(row: str, base):
    """'num_queries=16,steps=600' -> (is_lora, DemoConfig)."""
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    lora, changes = False, {}
    for part in filter(None, row.split(",")):
        if part in ("default", "lora"):
            lora = lora or part == "lora"
            continue
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"Unknown setting {key!r} in {row!r}; settings: {sorted(types)}.")
        if types[key] is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = types[key](value) if types[key] is not type(None) else int(value)
    return lora, replace(base, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help="sweep rows (default: the built-in sweep)")
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_sweep.jsonl"), help="results file (JSONL)")
    args = parser.parse_args()
    demo = load_demo()
    demo.quiet_libraries()
    torch.set_num_threads(1)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from slq_hf import SLQModel

    base = demo.DemoConfig(log_every=10**9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    datasets = demo.evaluation_sets(base)
    processor = AutoProcessor.from_pretrained(base.backbone)
    print("| setting | caption t2i | caption i2t | knowledge t2i | knowledge i2t | train s |", flush=True)
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for row in args.rows or DEFAULT_SWEEP:
        lora, config = parse_row(row, base)
        torch.manual_seed(config.seed)
        backbone = AutoModelForImageTextToText.from_pretrained(config.backbone, dtype=torch.float32).eval()
        started = time.perf_counter()
        files = demo.training_corpus(config)
        if lora:
            demo.train_lora(backbone, processor, config, files)
            encoder = demo.last_token_encoder(backbone, processor, config.eval_batch_size)
        else:  # `slq-hf train`, as the demo runs it
            folder = Path(config.out) / "sweep-slq"
            demo.train_slq(config, files, folder)
            encoder = SLQModel.from_pretrained(folder, backbone=backbone, processor=processor)
        seconds = time.perf_counter() - started
        recall = demo.recall_row(demo.evaluate(encoder, datasets, config))
        cells = " | ".join(f"{recall[f'{p} {d}']:.1f}" for p, d in demo.COLUMNS)
        print(f"| {row} | {cells} | {seconds:.0f} |", flush=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps({"row": row, "lora": lora, "recall": recall, "seconds": seconds}) + "\n")


if __name__ == "__main__":
    main()
