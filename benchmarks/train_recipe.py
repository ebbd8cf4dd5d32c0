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
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import the repository's slq_hf
    sys.path.append(str(ROOT))

sys.path.insert(0, str(ROOT / "examples" / "toy"))
from corpus import DRAWINGS_PER_COMBINATION, write_corpus  # noqa: E402  (examples/toy/corpus.py)

TOY_BACKBONE = ROOT / "examples" / "toy" / "backbone"

# Settings every recipe shares: the toy's size of model and batch.
COMMON = ["--num-queries", "8", "--batch-size", "32", "--logging-steps", "100"]
# name -> (what it is, extra `slq-hf train` arguments). "default" is the CLI's own defaults for everything else.
TOY = ["--lr", "3e-2", "--max-steps", "500", "--warmup", "25"]
TOY_1000 = ["--lr", "3e-2", "--max-steps", "1000", "--warmup", "50", "--lr-scheduler", "cosine", "--eval-data",
            "{validation}", "--eval-steps", "100"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    "toy-default": ("cosine schedule, eval on the validation file every 50 steps, final model = best eval_mean_R@1",
                    [*TOY, "--lr-scheduler", "cosine", "--eval-data", "{validation}", "--eval-steps", "50"]),
    # Not trained separately: evaluation draws no random numbers, so the toy-default run's last checkpoint IS the
    # model a run without --eval-data ends with (same seed, same batches, same updates).
    "cosine-last": ("cosine schedule, final model = last step (the toy-default run's last checkpoint)", []),
    "toy-1000": ("the same for 1000 steps (3.3 epochs), warmup 50, eval every 100 steps", TOY_1000),
    "toy-1000-last": ("toy-1000, final model = last step (its last checkpoint)", []),
    "lr-1e-2": ("toy-1000 with lr 1e-2", [*TOY_1000[:1], "1e-2", *TOY_1000[2:]]),
    "wd-0.1": ("toy-1000 with weight decay 0.1 on the queries", [*TOY_1000, "--weight-decay", "0.1"]),
    "wd-1": ("toy-1000 with weight decay 1.0 on the queries", [*TOY_1000, "--weight-decay", "1.0"]),
    "wd-3": ("toy-1000 with weight decay 3.0 on the queries", [*TOY_1000, "--weight-decay", "3.0"]),
    "linear-last": ("as in the issue: the Trainer's linear schedule, final model = last step",
                    [*TOY, "--lr-scheduler", "linear"]),
}


# What the rows show, written under the table (the numbers are those of the committed results).
READING = """\
Train seconds are wall time on the shared 2-core machine (other jobs running), not comparable between rows.

Reading. **The default toy recipe, `wd-1`, meets the target**: 90.7 explicit / 84.2 knowledge t2i R@1 on average,
lowest seed 88.0 / 83.3 (target: 80 / 60, none below 70 / 50). It is `toy-1000` plus `--weight-decay 1.0` on the
queries, and the same seeds without weight decay give 78.2 / 55.6 (lowest 76.7 / 46.7).

- **Why the knowledge transfer fell on repeated data**: the queries' norms grow while the same 150 captions come
  round again (toy-1000 seed 0: 2.1 at initialisation, 3.0 at step 100, 4.2-6.6 at step 1000; the mean
  token-embedding norm is 2.0). The residual stream at the query positions is then mostly the queries' own vector
  rather than what attention read from the prompt, so the queries fit the training captions' wording instead of
  reading the backbone's conclusion about the text, and knowledge captions, which are never trained on, stop
  landing. Weight decay keeps the norms at about 0.5 (wd-1 seed 0) and the transfer intact: knowledge t2i 83-85 on
  every seed. (The norms are measured; that they are the cause is the reading that fits them.)
- **Strength**: 0.1 (one seed, 74.7 / 66.7) is too weak; 1.0 and 3.0 are level within the seed spread (90.7 / 84.2
  vs 90.0 / 82.9), so 1.0 is the default for the toy. SLQTrainer never decays the temperature (decaying
  log(1 / temperature) would pull it towards 1).
- **Schedule**: cosine beats linear on three seeds (500 steps, last step: 68.9 / 59.1 vs 62.4 / 48.2), so cosine
  stays the CLI default.
- **Not better**: lr 1e-2 (two seeds, 63.7 / 47.7), and three seed-0 probes without weight decay in scratch runs
  (not in the table): masking in-batch duplicates of a caption out of the negatives (a patched loss, 70.0 / 50.0), a
  contrastive batch of 64 for 500 steps (54.0 / 42.7), and `--query-init vocab` (82.7 explicit but 26.0 knowledge;
  not investigated further).
- **Checkpoint selection** by explicit-caption validation recall changes little here: with weight decay the best
  checkpoint is at step 900-1000 on every seed.
- **Real backbones** keep the paper's default, no weight decay, for its single epoch: no run here measures a real
  backbone. `slq-hf train` prints a note when a run makes more than 1.5 epochs without weight decay."""


def prepare_data(folder: Path) -> dict[str, Path]:
    """The corpus, validation and test files (``examples/toy/corpus.py``, the demo's data), written once."""
    return write_corpus(folder, DRAWINGS_PER_COMBINATION)


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


# recipe -> (recipe it is read from, which checkpoint)
DERIVED = {"cosine-last": "toy-default", "toy-1000-last": "toy-1000"}


def evaluate_model(model: Path, files: dict[str, Path], prefix: Path, log: Path) -> tuple[dict, list[list[str]]]:
    """`slq-hf eval` of ``model`` on both caption sets: ({"caption t2i": R@1 %, ...}, the command lines)."""
    recall, commands = {}, []
    for part in ("caption", "knowledge"):
        result = prefix.with_name(f"{prefix.name}-{part}.json")
        commands.append(eval_command(model, files[f"test_{part}"], result))
        _run(commands[-1], log)
        metrics = json.loads(result.read_text())["metrics"]
        recall[f"{part} t2i"] = 100 * metrics["t2i"]["R@1"]
        recall[f"{part} i2t"] = 100 * metrics["i2t"]["R@1"]
    return recall, commands


def run_derived(recipe: str, source_row: dict, files: dict[str, Path], work: Path) -> dict:
    """A recipe read off another recipe's run: its last checkpoint, evaluated with `slq-hf eval`."""
    seed = source_row["seed"]
    out = work / "runs" / f"{source_row['recipe']}-seed{seed}"
    last = out / f"checkpoint-{source_row['steps']}"
    log = work / "runs" / f"{recipe}-seed{seed}.log"
    recall, commands = evaluate_model(last, files, work / "runs" / f"{recipe}-seed{seed}", log)
    return {"recipe": recipe, "seed": seed, "recall": recall, "train_seconds": source_row["train_seconds"],
            "steps": source_row["steps"], "best": None,
            "commands": [source_row["commands"][0], *(shlex.join(c) for c in commands)]}


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
    recall, evals = evaluate_model(out, files, work / "runs" / f"{recipe}-seed{seed}", log)
    commands += evals
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
            if len(values) == 1:  # one seed has no spread: say so rather than print ± 0.0
                cells.append(f"{values[0]:.1f} (one seed)")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} [{min(values):.1f}]")
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
    parser.add_argument("--write", action="store_true", help="replace the BENCHMARKS.md train-recipe section")
    args = parser.parse_args()
    results = args.work / "results.jsonl"
    files = prepare_data(args.work / "data")
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    if not args.table:
        order = sorted(args.recipes, key=lambda r: r in DERIVED)  # derived recipes after their sources
        for seed in args.seeds:
            for recipe in order:
                if any(r["recipe"] == recipe and r["seed"] == seed for r in rows):
                    continue
                if recipe in DERIVED:
                    source = [r for r in rows if r["recipe"] == DERIVED[recipe] and r["seed"] == seed]
                    if not source:
                        continue  # its source run is not done yet
                    row = run_derived(recipe, source[0], files, args.work)
                else:
                    row = run_one(recipe, seed, files, args.work)
                print(json.dumps(row), flush=True)
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
    rows = [r for r in rows if r["recipe"] in args.recipes]
    lines = [table(rows), ""]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        first = min((r for r in rows if r["recipe"] == recipe), key=lambda r: r["seed"])
        example = first["commands"]
        lines.append(f"- **{recipe}**: {RECIPES[recipe][0]}. Seed {first['seed']}: `{example[0]}`, then "
                     f"`{example[-2]}` (and the same with `test_knowledge.jsonl`).")
    lines += ["", "Per seed (t2i R@1 explicit / knowledge): " + "; ".join(
        f"{r['recipe']} seed {r['seed']} {r['recall']['caption t2i']:.1f} / {r['recall']['knowledge t2i']:.1f}"
        + (f" (best eval_mean_R@1 {r['best']['value']:.1f} at {Path(r['best']['checkpoint']).name})"
           if r.get("best") else "") for r in sorted(rows, key=lambda r: (r["recipe"], r["seed"])))]
    body = "\n".join(lines)
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        intro = ("Command: `nice -n 10 .venv/bin/python benchmarks/train_recipe.py --write` (each row: `slq-hf train` "
                 "then `slq-hf eval` on the 150 held-out scenes, with explicit and with knowledge captions; the "
                 "corpus is 64 drawings per combination = 9,600 pairs, explicit captions only; 32 pairs a step, 8 "
                 "queries, lr 3e-2; knowledge captions are never used in training or selection). Mean ± standard "
                 "deviation [minimum] over seeds, R@1 %. Target for the default toy recipe: mean >= 80 explicit and "
                 ">= 60 knowledge t2i, no seed below 70 / 50. The default toy recipe is `wd-1`.")
        write_section(ROOT / "BENCHMARKS.md", "train-recipe",
                      "### Training recipe: `slq-hf train` on a fixed toy corpus (issue 15)\n\n" + intro + "\n\n"
                      + body + "\n\n" + READING)


if __name__ == "__main__":
    main()
