"""GradCache vs a plain contrastive batch: peak memory and step time of one SLQ training step on the toy backbone.

Variants (each in its own process, so peak-RSS numbers do not mix): plain batches of 32, 64, 128 and 256 pairs, and
GradCache with a contrastive batch of 256 in micro-batches of 32. A step is forward + backward of the queries and the
temperature on an already collated batch (the same 256 toy image/caption pairs; plain batches use the first B).
Memory is the peak RSS above the RSS before the step (activations and autograd buffers), measured after a warm-up
step. The memory cap is GradCache's own peak: the largest plain batch under it is what a user without GradCache
could train with the same memory.

    .venv/bin/python benchmarks/gradcache.py [--write]   # --write: replace the BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import call_memory, machine, memory_subprocess, write_section  # noqa: E402

TOY_BACKBONE = ROOT / "examples" / "toy" / "backbone"
CONTRASTIVE, MICRO = 256, 32
VARIANTS = {"plain 32": (32, None), "plain 64": (64, None), "plain 128": (128, None), "plain 256": (256, None),
            f"GradCache {CONTRASTIVE} / {MICRO}": (CONTRASTIVE, MICRO)}


def child(name: str, rounds: int) -> None:
    """Measure one variant; prints one JSON line."""
    import torch

    from slq_hf import SLQModel
    from slq_hf.testing.toy_scenes import combinations, scene_for
    from slq_hf.training import SLQDataCollator
    from slq_hf.training.gradcache import MICRO_BATCHES_KEY, gradcache_backward

    torch.set_num_threads(1)
    batch_size, micro = VARIANTS[name]
    model = SLQModel.from_backbone(str(TOY_BACKBONE), num_queries=8, dtype=torch.float32)
    model.train()
    rng = random.Random(0)
    scenes = [scene_for(rng.choice(combinations()), rng) for _ in range(batch_size)]
    examples = [{"image": s.image, "text": s.caption} for s in scenes]
    batch = SLQDataCollator(model.processor, micro_batch_size=micro)(examples)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if micro is None:
            model(**batch).loss.backward()
        else:
            gradcache_backward(model, batch[MICRO_BATCHES_KEY])

    extra_mib, peak_mib = call_memory(step)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"name": name, "batch": batch_size, "micro": micro, "extra_mib": extra_mib, "peak_mib": peak_mib,
                      "seconds": statistics.median(seconds)}))


def interleaved_times(rounds: int) -> dict[str, float]:
    """Step time of plain 256 and GradCache 256/32 in ONE process, alternating, on the same collated pairs: the
    ratio is then fair even when the machine's load changes (median seconds per variant)."""
    import torch

    from slq_hf import SLQModel
    from slq_hf.testing.toy_scenes import combinations, scene_for
    from slq_hf.training import SLQDataCollator
    from slq_hf.training.gradcache import MICRO_BATCHES_KEY, gradcache_backward

    torch.set_num_threads(1)
    model = SLQModel.from_backbone(str(TOY_BACKBONE), num_queries=8, dtype=torch.float32)
    model.train()
    rng = random.Random(0)
    scenes = [scene_for(rng.choice(combinations()), rng) for _ in range(CONTRASTIVE)]
    examples = [{"image": s.image, "text": s.caption} for s in scenes]
    plain = SLQDataCollator(model.processor)(examples)
    cached = SLQDataCollator(model.processor, micro_batch_size=MICRO)(examples)[MICRO_BATCHES_KEY]
    steps = {"plain 256": lambda: model(**plain).loss.backward(),
             f"GradCache {CONTRASTIVE} / {MICRO}": lambda: gradcache_backward(model, cached)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, step in (steps.items() if round_ % 2 else reversed(steps.items())):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def report(results: dict[str, dict]) -> str:
    base = results["plain 256"]
    cached = results[f"GradCache {CONTRASTIVE} / {MICRO}"]
    fitting = [r for r in results.values() if r["micro"] is None and r["extra_mib"] <= cached["extra_mib"]]
    largest = max(fitting, key=lambda r: r["batch"]) if fitting else None
    lines = ["| variant | contrastive batch | step memory MiB (x plain 256) | step s (x plain 256) | s per pair |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['batch']} | {r['extra_mib']:.0f} ({r['extra_mib'] / base['extra_mib']:.2f}x) | "
                     f"{r['seconds']:.2f} ({r['seconds'] / base['seconds']:.2f}x) | "
                     f"{1000 * r['seconds'] / r['batch']:.1f} ms |")
    cap = (f"Memory cap = GradCache's step memory ({cached['extra_mib']:.0f} MiB): the largest plain batch under it: "
           + (f"{largest['batch']} pairs ({largest['extra_mib']:.0f} MiB), {CONTRASTIVE // largest['batch']}x fewer "
              "negatives than GradCache's 256." if largest else "none of the measured plain batches."))
    return "\n".join([*lines, "", cap])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per variant (median)")
    parser.add_argument("--write", action="store_true", help="replace the BENCHMARKS.md gradcache section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--time-rounds", type=int, default=3, help="interleaved timing rounds (0: skip)")
    parser.add_argument("--memory-from", type=Path, default=None, metavar="LOG",
                        help="reuse the per-variant JSON lines of an earlier run's output instead of re-measuring")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    results = {}
    if args.memory_from:
        for line in args.memory_from.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["name"]] = row
    for name in [n for n in VARIANTS if n not in results]:
        results[name] = memory_subprocess([sys.executable, __file__, "--child", name, "--rounds", str(args.rounds)],
                                          threads=1, label=name)
        print(json.dumps(results[name]), flush=True)
    command = "nice -n 10 .venv/bin/python benchmarks/gradcache.py --write"
    body = (f"Command: `{command}` ({machine()}, 1 thread; the machine was shared, so times carry noise).\n\n"
            f"One SLQ training step on the toy backbone (8 queries), image/caption pairs.\n\n{report(results)}")
    if args.time_rounds:
        times = interleaved_times(args.time_rounds)
        names = list(times)
        body += (f"\n\nStep time in one process, {args.time_rounds} interleaved rounds (median): "
                 + ", ".join(f"{n} {times[n]:.2f} s" for n in names)
                 + f"; GradCache / plain = {times[names[1]] / times[names[0]]:.2f}x (the second forward of every "
                 "micro-batch).")
    print(body)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", "gradcache", body)


if __name__ == "__main__":
    main()
