"""Training recipe on the toy backbone, measured through the product: `slq-hf train` then `slq-hf eval`.

What a user with a real dataset does, in miniature: a FIXED corpus (64 drawings of each of the 150 toy combinations,
9,600 PNG files, explicit captions only) trained for several epochs, a small validation file for ``--eval-data``
(150 other drawings, explicit captions) and a held-out test split (``heldout_scenes()``: 150 scenes never used in
training or selection) retrieved once with explicit and once with knowledge captions. Knowledge captions are never
seen in training or model selection: they measure whether the backbone's knowledge still reaches the embedding.

    .venv/bin/python benchmarks/train_recipe.py                     # every recipe, seeds 0 1 2
    .venv/bin/python benchmarks/train_recipe.py --recipes default --seeds 0 1 2 3
    .venv/bin/python benchmarks/train_recipe.py --write             # also rewrite the BENCHMARKS.md section

Each (recipe, seed) is one `slq-hf train` and two `slq-hf eval` subprocesses (the exact command lines are printed
and stored); results are appended to ``outputs/train_recipe/results.jsonl`` and a finished (recipe, seed) is not
re-run, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import the repository's slq_hf
    sys.path.append(str(ROOT))

from slq_hf.testing.toy_scenes import TRAIN_SEED, combinations, heldout_scenes, scene_for  # noqa: E402

TOY_BACKBONE = ROOT / "examples" / "toy" / "backbone"
DRAWINGS_PER_COMBINATION = 64
VALIDATION_SEED = 2_000_003  # a stream neither the corpus (TRAIN_SEED) nor the test split (HELDOUT_SEED) uses

# Settings every recipe shares: the toy's size of model and batch.
COMMON = ["--num-queries", "8", "--batch-size", "32", "--logging-steps", "100"]
# name -> (what it is, extra `slq-hf train` arguments). "default" is the CLI's own defaults for everything else.
TOY = ["--lr", "3e-2", "--max-steps", "1000", "--warmup", "50"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    "toy-default": ("cosine schedule, eval on the validation file every 100 steps, final model = best eval_mean_R@1",
                    [*TOY, "--lr-scheduler", "cosine", "--eval-data", "{validation}", "--eval-steps", "100"]),
    "cosine-last": ("cosine schedule, no evaluation, final model = last step", [*TOY, "--lr-scheduler", "cosine"]),
    "linear-last": ("as in the issue: the Trainer's linear schedule, final model = last step",
                    [*TOY, "--lr-scheduler", "linear"]),
}


def prepare_data(folder: Path) -> dict[str, Path]:
    """Write the corpus, validation and test files once (deterministic; reused when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl",
             "test_caption": folder / "test_caption.jsonl", "test_knowledge": folder / "test_knowledge.jsonl"}
    if all(path.is_file() for path in files.values()):
        return files
    images = folder / "images"
    images.mkdir(exist_ok=True)
    rng = random.Random(TRAIN_SEED)
    lines = []
    for round_ in range(DRAWINGS_PER_COMBINATION):
        for index, combination in enumerate(combinations()):
            scene = scene_for(combination, rng)
            name = f"images/train_{round_:02d}_{index:03d}.png"
            scene.image.save(folder / name)
            lines.append({"image": name, "text": scene.caption})
    _write_jsonl(files["train"], lines)
    rng = random.Random(VALIDATION_SEED)
    lines = []
    for index, combination in enumerate(combinations()):
        scene = scene_for(combination, rng)
        name = f"images/validation_{index:03d}.png"
        scene.image.save(folder / name)
        lines.append({"image": name, "text": scene.caption})
    _write_jsonl(files["validation"], lines)
    captions, knowledge = [], []
    for index, scene in enumerate(heldout_scenes()):
        name = f"images/test_{index:03d}.png"
        scene.image.save(folder / name)
        captions.append({"image": name, "text": scene.caption})
        knowledge.append({"image": name, "text": scene.knowledge_caption})
    _write_jsonl(files["test_caption"], captions)
    _write_jsonl(files["test_knowledge"], knowledge)
    return files


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def train_command(recipe: str, seed: int, files: dict[str, Path], out: Path) -> list[str]:
    """The `slq-hf train` command line of one (recipe, seed)."""
    _, extra = RECIPES[recipe]
    extra = [str(files["validation"]) if arg == "{validation}" else arg for arg in extra]
    return ["slq-hf", "train", "--backbone", str(TOY_BACKBONE), "--train-data", str(files["train"]),
            "--output-dir", str(out), *COMMON, *extra, "--seed", str(seed), "--overwrite-output-dir"]


def eval_command(model: Path, data: Path, output: Path) -> list[str]:
    return ["slq-hf", "eval", "--model", str(model), "--data", str(data), "--split", "all", "--batch-size", "64",
            "--output", str(output), "--no-progress"]


def _run(command: list[str], log: Path) -> None:
    """Run an `slq-hf` command line with this interpreter; its output goes to ``log``."""
    argv = [sys.executable, "-m", "slq_hf.cli", *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PYTHONPATH", str(ROOT))
    with log.open("a") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed (exit {done.returncode}); see {log}")


def run_one(recipe: str, seed: int, files: dict[str, Path], work: Path) -> dict:
    """Train one (recipe, seed) with `slq-hf train`, evaluate the final model with `slq-hf eval` on both caption
    sets; returns the result row."""
    out = work / "runs" / f"{recipe}-seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = work / "runs" / f"{recipe}-seed{seed}.log"
    log.unlink(missing_ok=True)
    started = time.time()
    commands = [train_command(recipe, seed, files, out)]
    _run(commands[0], log)
    seconds = time.time() - started
    recall = {}
    for part in ("caption", "knowledge"):
        result = work / "runs" / f"{recipe}-seed{seed}-{part}.json"
        commands.append(eval_command(out, files[f"test_{part}"], result))
        _run(commands[-1], log)
        metrics = json.loads(result.read_text())["metrics"]
        recall[f"{part} t2i"] = 100 * metrics["t2i"]["R@1"]
        recall[f"{part} i2t"] = 100 * metrics["i2t"]["R@1"]
    summary = json.loads((out / "training_summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "recall": recall, "train_seconds": round(seconds, 1),
            "steps": summary["steps"], "best": summary.get("best_metric"),
            "commands": [shlex.join(c) for c in commands]}


def table(rows: list[dict]) -> str:
    """Markdown: one line per recipe, mean ± standard deviation [min] over seeds of each R@1."""
    keys = ["caption t2i", "knowledge t2i", "caption i2t", "knowledge i2t"]
    lines = ["| recipe | seeds | " + " | ".join(f"{k} R@1 mean ± sd [min]" for k in keys) + " | train s |",
             "|---|---|" + "---:|" * (len(keys) + 1)]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = []
        for key in keys:
            values = [r["recall"][key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f} [{min(values):.1f}]")
        seconds = statistics.mean(r["train_seconds"] for r in mine)
        seeds = ",".join(str(r["seed"]) for r in sorted(mine, key=lambda r: r["seed"]))
        lines.append(f"| {recipe} | {seeds} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "train_recipe", help="data, runs, results")
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()
    results = args.work / "results.jsonl"
    files = prepare_data(args.work / "data")
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    if not args.table:
        for seed in args.seeds:
            for recipe in args.recipes:
                if any(r["recipe"] == recipe and r["seed"] == seed for r in rows):
                    continue
                row = run_one(recipe, seed, files, args.work)
                print(json.dumps(row), flush=True)
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
    rows = [r for r in rows if r["recipe"] in args.recipes]
    print(table(rows))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        example = next(r for r in rows if r["recipe"] == recipe)["commands"][0]
        print(f"- {recipe}: {RECIPES[recipe][0]}; e.g. `{example}`")


if __name__ == "__main__":
    main()
