"""SLQ encoding cost: SLQ forward vs the bare backbone's no-grad forward, throughput, and padding waste.

Everything runs on the CPU-sized Qwen3-VL of ``benchmarks/common.py`` (random weights, the real classes and
processor) with a mixed set of images (several sizes and aspect ratios) and captions of varied length, arranged as a
pairs file arrives (image, caption, image, caption, ...).

Measured in interleaved rounds (the order of the blocks rotates every round; bare and SLQ run back to back on each
batch, in alternating order, so both sides of the ratio see the same load from other processes on the shared cores):

- ``bare forward``: the backbone's base model on the processed, length-sorted batches, ``torch.no_grad()``;
- ``SLQ forward``: ``SLQModel(**batch)`` on the very same batches (left re-lay, N_q query slots, pooling);
- ``SLQ forward, input order``: SLQ on batches cut in input order (no length sorting): what sorting saves;
- ``SLQ encode``: ``SLQModel.encode(items)`` end to end (chat template, image processing, sorting, forward).

The SLQ/bare ratio is checked against 1 + N_q/L + 0.05 (L = mean real prompt length of the batches' items): the
queries add N_q positions to prompts of L tokens, so attention and MLP cost grow by about N_q/L and nothing else
should cost extra. Padding waste = padded positions / all positions of the prompt tensors.

Ratios and throughput use the process's CPU time (``time.process_time``, one torch thread): on cores shared with
other jobs, wall time mostly measures the neighbours; CPU time is what the work costs. Wall medians are shown too.

    .venv/bin/python benchmarks/encode.py                        # print the table (about 3 minutes on 2 cores)
    .venv/bin/python benchmarks/encode.py --write BENCHMARKS.md  # also fill its encode section
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import build_bench_qwen3_vl, check, machine, rotation, wall_and_cpu, write_section  # noqa: E402

SECTION = "encode"
VARIANTS = ("bare forward", "SLQ forward", "SLQ forward, input order", "SLQ encode")
WORDS = ("a red square on a grey background next to a small blue circle in the top left corner while a green "
         "triangle and a yellow star sit below it near the bottom edge of the picture").split()


# ---------------------------------------------------------------------------------------------------------- setup
def make_items(num_images: int, num_captions: int, min_px: int, max_px: int, seed: int) -> list:
    """Pairs-file order: image, caption, image, caption, ... (images of mixed size, captions of 4-24 words)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(num_images):
        width = int(rng.integers(min_px, max_px + 1))
        height = int(rng.integers(min_px, max_px + 1))
        images.append(Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
    for i in range(num_captions):
        length = int(rng.integers(4, 25))
        captions.append(" ".join(WORDS[j % len(WORDS)] for j in range(i, i + length)))
    items = []
    for i in range(max(num_images, num_captions)):
        items.extend(([images[i]] if i < num_images else []) + ([captions[i]] if i < num_captions else []))
    return items


def make_batches(processor, items: list, batch_size: int, sort: bool) -> list[dict]:
    """Processed batches as ``SLQModel.encode`` builds them (``sort``) or cut in input order."""
    from slq_hf.processing import collate, to_items

    normalised = to_items(items)
    order = sorted(range(len(items)), key=lambda i: normalised[i].length_key()) if sort else range(len(items))
    order = list(order)
    return [dict(collate(processor, [normalised[i] for i in order[s : s + batch_size]]))
            for s in range(0, len(order), batch_size)]


def padding_stats(batches: list[dict]) -> dict[str, float]:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return {"real": real, "total": total, "waste": 1 - real / total}


def mean_prompt_length(batches: list[dict], image_token_id: int, kind: str | None = None) -> float:
    """Mean real prompt tokens per item; ``kind`` "image"/"text" keeps the items of that modality only."""
    lengths = []
    for batch in batches:
        real = batch["attention_mask"].sum(1)  # (B,)
        has_image = (batch["input_ids"] == image_token_id).any(1)  # (B,)
        keep = torch.ones_like(has_image) if kind is None else has_image == (kind == "image")
        lengths.extend(real[keep].tolist())
    return statistics.mean(lengths) if lengths else float("nan")


# ---------------------------------------------------------------------------------------------------------- timing
Timing = dict[str, list[float]]  # batch kind ("image" | "text" | "mixed") -> [wall seconds, CPU seconds]


def _timed(fn: Callable[[], object], into: Timing, kind: str) -> None:
    wall, cpu = wall_and_cpu(fn)
    spent = into.setdefault(kind, [0.0, 0.0])
    spent[0] += wall
    spent[1] += cpu


def build_blocks(args) -> tuple[dict[str, Callable[[int, dict[str, Timing]], None]], dict]:
    """Timed blocks of one round; each adds {kind: [wall, cpu]} under its variant names."""
    from slq_hf import SLQModel

    model, processor = build_bench_qwen3_vl(text_hidden=args.text_hidden, text_layers=args.text_layers,
                                            seed=args.seed)
    slq = SLQModel.from_backbone(model, num_queries=args.num_queries, processor=processor).eval()
    items = make_items(args.num_images, args.num_captions, args.min_image_px, args.max_image_px, args.seed)
    sorted_batches = make_batches(processor, items, args.batch_size, sort=True)
    input_batches = make_batches(processor, items, args.batch_size, sort=False)
    image_token = model.config.image_token_id

    def kind(batch: dict) -> str:
        if "pixel_values" not in batch:
            return "text"
        # Image prompts contain image tokens on every row; a mixed batch has rows without any.
        return "image" if bool((batch["input_ids"] == image_token).any(1).all()) else "mixed"

    def bare(batch: dict) -> object:
        return model.model(**batch, use_cache=False)

    def paired(round_index: int, out: dict[str, Timing]) -> None:
        # bare and SLQ run back to back on each batch (order alternating), so both see the same machine load.
        with torch.no_grad():
            for i, batch in enumerate(sorted_batches):
                pair = [("bare forward", bare), ("SLQ forward", lambda b: slq(**b))]
                for name, fn in pair if (round_index + i) % 2 == 0 else pair[::-1]:
                    _timed(lambda fn=fn, batch=batch: fn(batch), out[name], kind(batch))

    def input_order(round_index: int, out: dict[str, Timing]) -> None:
        with torch.no_grad():
            for batch in input_batches:
                _timed(lambda batch=batch: slq(**batch), out["SLQ forward, input order"], "mixed")

    def encode(round_index: int, out: dict[str, Timing]) -> None:
        _timed(lambda: slq.encode(items, batch_size=args.batch_size, show_progress_bar=False), out["SLQ encode"],
               "mixed")

    facts = {
        "items": len(items),
        "L_all": mean_prompt_length(sorted_batches, image_token),
        "L_image": mean_prompt_length(sorted_batches, image_token, "image"),
        "L_text": mean_prompt_length(sorted_batches, image_token, "text"),
        "padding_sorted": padding_stats(sorted_batches),
        "padding_input": padding_stats(input_batches),
        # Items per batch kind of the sorted batches (pure image / pure caption / mixed at the boundary).
        "count": {k: sum(len(b["input_ids"]) for b in sorted_batches if kind(b) == k) for k in ("image", "text")},
    }
    return {"paired": paired, "input order": input_order, "encode": encode}, facts


def time_interleaved(blocks: dict[str, Callable], rounds: int, warmup: int) -> dict[str, list[Timing]]:
    """Run every block once a round (order rotating); returns variant -> one Timing per timed round."""
    names = list(blocks)
    times: dict[str, list[Timing]] = {v: [] for v in VARIANTS}
    for r in range(warmup + rounds):
        out: dict[str, Timing] = {v: {} for v in VARIANTS}
        for name in rotation(names, r):
            blocks[name](r, out)
        if r >= warmup:
            for variant in VARIANTS:
                times[variant].append(out[variant])
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        print(f"  {label}: " + ", ".join(f"{v} {sum(t[0] for t in out[v].values()):.2f}s wall / "
                                         f"{sum(t[1] for t in out[v].values()):.2f}s cpu" for v in VARIANTS),
              flush=True)
    return times


# ------------------------------------------------------------------------------------------------------- reporting
def summarise(times: dict[str, list[Timing]], facts: dict, num_queries: int) -> tuple[str, list[str]]:
    def series(variant: str, kind: str | None, clock: int) -> list[float]:
        return [sum(v[clock] for k, v in t.items() if kind is None or k == kind) for t in times[variant]]

    def ratio(a: list[float], b: list[float]) -> float:
        # Median of per-round ratios: both sides of a ratio ran back to back in the same round.
        return statistics.median(x / y for x, y in zip(a, b))

    med = statistics.median
    rows = ["| | CPU time (s), median | items per CPU-second | SLQ / bare (CPU) | target ≤ 1 + N_q/L + 0.05 "
            "| mean prompt L | wall time (s), median |", "|---|---|---|---|---|---|---|"]
    checks = []
    for label, kind, count, length in (
        ("image prompts", "image", facts["count"]["image"], facts["L_image"]),
        ("caption prompts", "text", facts["count"]["text"], facts["L_text"]),
        ("all items", None, facts["items"], facts["L_all"]),
    ):
        bare, slq = series("bare forward", kind, 1), series("SLQ forward", kind, 1)
        if not count or not med(bare):
            continue
        r, target = ratio(slq, bare), 1 + num_queries / length + 0.05
        wall_bare, wall_slq = med(series("bare forward", kind, 0)), med(series("SLQ forward", kind, 0))
        rows.append(f"| {label}: bare → SLQ forward | {med(bare):.2f} → {med(slq):.2f} | {count / med(bare):.1f} → "
                    f"{count / med(slq):.1f} | {r:.3f}× | {target:.3f} | {length:.1f} | {wall_bare:.2f} → "
                    f"{wall_slq:.2f} |")
        checks.append(check(f"{label}: SLQ/bare {r:.3f}× ≤ {target:.3f}", r <= target))
    enc = series("SLQ encode", None, 1)
    rows.append(f"| SLQ `encode` end to end (template, image processing, forward) | {med(enc):.2f} | "
                f"{facts['items'] / med(enc):.1f} | | | | {med(series('SLQ encode', None, 0)):.2f} |")

    unsorted, slq_all = series("SLQ forward, input order", None, 1), series("SLQ forward", None, 1)
    ps, pi = facts["padding_sorted"], facts["padding_input"]
    pad = ["| batching | prompt positions (real / padded total) | padding waste | SLQ forward CPU time (s), median |",
           "|---|---|---|---|",
           f"| input order (image, caption, ...) | {pi['real']} / {pi['total']} | {100 * pi['waste']:.1f} % "
           f"| {med(unsorted):.2f} |",
           f"| length-sorted (what `encode` does) | {ps['real']} / {ps['total']} | {100 * ps['waste']:.1f} % "
           f"| {med(slq_all):.2f} |"]
    speedup = ratio(unsorted, slq_all)
    checks.append(check(f"length-sorted batching is faster than input order: {speedup:.2f}×", speedup > 1.0))
    return "\n".join(rows) + "\n\n" + "\n".join(pad), checks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--text-hidden", type=int, default=640, help="width of the Qwen3-VL text model")
    parser.add_argument("--text-layers", type=int, default=8, help="decoder layers of the text model")
    parser.add_argument("--num-images", type=int, default=8, help="images in the set")
    parser.add_argument("--num-captions", type=int, default=8, help="captions in the set")
    parser.add_argument("--min-image-px", type=int, default=160, help="smallest image side")
    parser.add_argument("--max-image-px", type=int, default=320, help="largest image side")
    parser.add_argument("--batch-size", type=int, default=4, help="encode batch size")
    parser.add_argument("--num-queries", type=int, default=16, help="SLQ latent queries N_q")
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings stable when other processes share the cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--write", type=Path, metavar="BENCHMARKS.md",
                        help="also replace the encode section of this markdown file with the results")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks, facts = build_blocks(args)
    load_before = os.getloadavg()[0]
    print(f"timing {args.rounds} interleaved rounds ({args.threads} thread(s)) ...", flush=True)
    times = time_interleaved(blocks, args.rounds, args.warmup)
    load_after = os.getloadavg()[0]
    tables, checks = summarise(times, facts, args.num_queries)
    command = "python benchmarks/encode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        "### Encoding: SLQ vs the bare backbone, throughput, padding",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}; load average {load_before:.1f} → {load_after:.1f} (cores shared with other jobs).  ",
        f"Setup: Qwen3-VL, random weights, text {args.text_hidden} wide × {args.text_layers} layers (bench config of "
        f"`benchmarks/common.py`), fp32, sdpa attention, {args.threads} torch thread(s); "
        f"{args.num_images} random-pixel images of {args.min_image_px}-{args.max_image_px} px (mixed aspect) and "
        f"{args.num_captions} captions of 4-24 words, batch size {args.batch_size}, N_q = {args.num_queries}.",
        "",
        f"Medians of {args.rounds} interleaved rounds after {args.warmup} warm-up round(s); bare and SLQ run back to "
        "back on every batch (order alternating), ratios are medians of per-round ratios of process CPU time (the "
        "cores are shared, so wall time mostly measures the neighbours; wall medians in the last column). Forward "
        "timings exclude processing (the same pre-processed, length-sorted batches go to both, under "
        "`torch.no_grad()`); `SLQ encode` includes it. L = mean real prompt tokens per item.",
        "",
        tables,
        "",
        "Targets:",
        *checks,
    ])
    print()
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
        print(f"\nwrote the {SECTION} section of {args.write}")


if __name__ == "__main__":
    main()
