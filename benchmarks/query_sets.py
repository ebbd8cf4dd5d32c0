"""K query sets on one prompt pass vs K separate encodes of the same batch: time and peak memory.

Everything runs on the CPU-sized Qwen3-VL of ``benchmarks/common.py`` (text 640 x 8 layers, random weights, the real
classes and processor) with K = 4 query sets of N_q = 16 queries and one batch of 8 images (256 px) + 8 captions
(DESIGN.md's bench batch). Variants, each on that same batch:

- ``1 set, encode``: ``model.encode(items)`` with one set: the unit everything is compared with;
- ``4 sets, 4 encodes``: ``model.encode(items)`` once per set (``use_query_set``): what a user does without
  query sets in one pass (chat template, image processing and the prompt forward all repeated K times);
- ``4 sets, one pass``: ``model.encode(items, query_sets=[...])``: one prompt pass into a KV cache, then all K*N_q
  queries in one pass with the block mask (``slq_hf/modeling/query_sets.py``);
- the same two at forward level on the pre-processed batch (``model(**batch)`` K times vs
  ``model(**batch, query_sets=[...])``), which leaves out preprocessing;
- training, forward + backward: K separate prefix-cache steps (one per active set) vs one joint step
  (``forward(query_sets=...)``: one prompt pass, K losses).

Times are medians over interleaved rounds (the order of the variants rotates every round, so every variant sees the
same load from other jobs on the shared cores), with one torch thread; CPU time (``time.process_time``) is what the
work costs, wall time is shown too. Ratio = (one pass) / (K separate); target <= 0.6 for the encode.

Peak memory: each variant runs in its own subprocess (``MALLOC_MMAP_THRESHOLD_`` set so freed tensors return to the
OS); after a warm-up call, ``malloc_trim`` and a reset of the kernel's peak-RSS counter (``/proc/self/clear_refs``),
one more call runs, and "call memory" is the peak RSS during it above the RSS before it (VmHWM - VmRSS).

    .venv/bin/python benchmarks/query_sets.py                        # print the table (a few minutes on 2 cores)
    .venv/bin/python benchmarks/query_sets.py --write BENCHMARKS.md  # also fill its query-sets section
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    build_bench_qwen3_vl,
    call_memory,
    machine,
    medians,
    memory_subprocess,
    time_interleaved,
    write_section,
)

SECTION = "query-sets"
# (label, group): the group pairs each one-pass variant with its K-separate baseline.
VARIANTS = {
    "1 set, encode": "unit",
    "K sets, K encodes": "encode",
    "K sets, one pass (encode)": "encode",
    "K sets, K forwards": "forward",
    "K sets, one pass (forward)": "forward",
    "train: K separate steps": "train",
    "train: one joint step": "train",
}
PAIRS = [("K sets, K encodes", "K sets, one pass (encode)"), ("K sets, K forwards", "K sets, one pass (forward)"),
         ("train: K separate steps", "train: one joint step")]


def make_items(num_images: int, num_captions: int, image_px: int, seed: int) -> list:
    """Images (random pixels, square) then captions of 6-20 words."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ("a red square on a grey background next to a small blue circle in the top left corner while a green "
             "triangle sits below it").split()
    images = [Image.fromarray(rng.integers(0, 256, size=(image_px, image_px, 3), dtype=np.uint8))
              for _ in range(num_images)]
    captions = [" ".join(words[j % len(words)] for j in range(i, i + int(rng.integers(6, 21))))
                for i in range(num_captions)]
    return images + captions


def build_variants(args) -> tuple[dict[str, Callable[[], object]], dict]:
    """The timed callables, one per variant, on one model and one batch."""
    from slq_hf import SLQModel
    from slq_hf.processing import collate, to_items

    backbone, processor = build_bench_qwen3_vl(text_hidden=args.text_hidden, text_layers=args.text_layers,
                                               seed=args.seed)
    model = SLQModel.from_backbone(backbone, num_queries=args.num_queries, processor=processor).eval()
    for k in range(1, args.num_sets):
        model.add_query_set(f"set{k}")
    sets = model.query_sets
    items = make_items(args.num_images, args.num_captions, args.image_px, args.seed)
    batch = dict(collate(processor, to_items(items)))
    image_side = dict(collate(processor, to_items(items[: args.num_images])))
    text_side = dict(collate(processor, to_items(items[args.num_images:][: args.num_images])))
    # images on the query side, captions on the positive side (row i pairs with row i)
    pair_batch = {**image_side, **{f"positive_{k}": v for k, v in text_side.items()}}
    size = len(items)

    def encode_one() -> object:
        return model.encode(items, batch_size=size)

    def encode_separately() -> object:
        out = {}
        for name in sets:
            with model.use_query_set(name):
                out[name] = model.encode(items, batch_size=size)
        return out

    def encode_together() -> object:
        return model.encode(items, batch_size=size, query_sets=sets)

    @torch.inference_mode()
    def forward_separately() -> object:
        out = {}
        for name in sets:
            with model.use_query_set(name):
                out[name] = model(**batch).pooler_output
        return out

    @torch.inference_mode()
    def forward_together() -> object:
        return model(**batch, query_sets=sets).pooler_outputs

    def train_separately() -> object:
        model.zero_grad(set_to_none=True)
        for name in sets:
            with model.use_query_set(name):
                model(**pair_batch).loss.backward()

    def train_together() -> object:
        model.zero_grad(set_to_none=True)
        model(**pair_batch, query_sets=sets).loss.backward()

    variants = dict(zip(VARIANTS, [encode_one, encode_separately, encode_together, forward_separately,
                                   forward_together, train_separately, train_together]))
    image_token = backbone.config.image_token_id
    facts = {
        "items": size,
        "prompt_tokens": float(batch["attention_mask"].sum(1).float().mean()),
        "padded_length": batch["input_ids"].shape[1],
        "image_tokens": int((batch["input_ids"] == image_token).sum(1).max()),
        "sets": len(sets),
        "num_queries": args.num_queries,
    }
    return variants, facts


# --------------------------------------------------------------------------------------------------------- memory
def _memory_child(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    variants, _ = build_variants(args)
    call_mib, peak_rss_mib = call_memory(variants[variant])  # its warm-up call also allocates the grads
    print(json.dumps({"variant": variant, "call_mib": call_mib, "peak_rss_mib": peak_rss_mib}))


def measure_memory(args) -> dict[str, dict]:
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", variant, *_shared_cli(args)]
        results[variant] = memory_subprocess(cmd, args.threads, variant)
        print(f"  {variant}: call {results[variant]['call_mib']:.0f} MiB", flush=True)
    return results


# ------------------------------------------------------------------------------------------------------ reporting
def table(times: dict, memory: dict | None, facts: dict, args) -> str:
    med = medians(times)
    unit = med["1 set, encode"]["cpu"]
    k = facts["sets"]
    rows = ["| variant | CPU (s) | × 1-set encode | wall (s) | call memory (MiB) | peak RSS (MiB) |",
            "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        mem = memory.get(name) if memory else None
        rows.append(f"| {name.replace('K ', f'{k} ')} | {med[name]['cpu']:.2f} | {med[name]['cpu'] / unit:.2f}× | "
                    f"{med[name]['wall']:.2f} | {mem['call_mib']:.0f} | {mem['peak_rss_mib']:.0f} |" if mem else
                    f"| {name.replace('K ', f'{k} ')} | {med[name]['cpu']:.2f} | {med[name]['cpu'] / unit:.2f}× | "
                    f"{med[name]['wall']:.2f} | - | - |")
    ratios = ["", "| one pass / separate | CPU ratio | wall ratio | memory ratio |", "|---|---|---|---|"]
    for separate, together in PAIRS:
        mem = (f"{memory[together]['call_mib'] / memory[separate]['call_mib']:.2f}" if memory else "-")
        ratios.append(f"| {VARIANTS[together]} | {med[together]['cpu'] / med[separate]['cpu']:.2f} | "
                      f"{med[together]['wall'] / med[separate]['wall']:.2f} | {mem} |")
    encode_ratio = med["K sets, one pass (encode)"]["cpu"] / med["K sets, K encodes"]["cpu"]
    verdict = "met" if encode_ratio <= 0.6 else "NOT met"
    lines = [
        f"K = {k} query sets × N_q = {facts['num_queries']} on the bench Qwen3-VL (text {args.text_hidden} × "
        f"{args.text_layers} layers, random weights); one batch of {args.num_images} images ({args.image_px} px, "
        f"{facts['image_tokens']} image tokens) + {args.num_captions} captions = {facts['items']} items, mean "
        f"prompt {facts['prompt_tokens']:.0f} tokens (padded to {facts['padded_length']}). Medians of "
        f"{args.rounds} interleaved rounds, {args.threads} torch thread(s); {machine()}.",
        "",
        *rows,
        *ratios,
        "",
        f"Target: {k} sets in one pass ≤ 0.6 × {k} separate encodes: **{verdict}** ({encode_ratio:.2f} CPU). "
        "\"call memory\" = peak RSS during one call above the RSS before it (own subprocess per variant). The train "
        "rows are on a pair batch (images on one side, captions on the other, forward + backward); separate steps "
        "already use the prefix cache, so the joint step saves the repeated prompt passes only, and it holds the "
        "activations of all K sets for one backward (its memory grows linearly with K) where separate steps free "
        "theirs after each backward. Inference keeps no activations, so one pass costs only the K·N_q query "
        "states and the shared KV cache.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/query_sets.py --write BENCHMARKS.md`",
    ]
    return "\n".join(lines)


def _shared_cli(args) -> list[str]:
    return ["--text-hidden", str(args.text_hidden), "--text-layers", str(args.text_layers), "--num-sets",
            str(args.num_sets), "--num-queries", str(args.num_queries), "--num-images", str(args.num_images),
            "--num-captions", str(args.num_captions), "--image-px", str(args.image_px), "--seed", str(args.seed),
            "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-hidden", type=int, default=640)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--num-sets", type=int, default=4, help="K (default 4)")
    parser.add_argument("--num-queries", type=int, default=16, help="N_q of every set (default 16)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--num-captions", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--write", type=Path, metavar="MD", help="fill the query-sets section of this markdown file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return
    torch.set_num_threads(args.threads)
    variants, facts = build_variants(args)
    print(f"timing {len(variants)} variants, {args.rounds} rounds (+{args.warmup} warm-up)", flush=True)
    times = time_interleaved(variants, args.rounds, args.warmup)
    del variants
    gc.collect()
    memory = None if args.no_memory else measure_memory(args)
    body = table(times, memory, facts, args)
    print("\n" + body)
    if args.write:
        write_section(args.write, SECTION, f"## Query sets: K sets in one pass\n\n{body}")
        print(f"\nwrote the {SECTION} section of {args.write}")


if __name__ == "__main__":
    main()
