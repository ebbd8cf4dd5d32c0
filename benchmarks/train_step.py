"""One training step, side by side: no-grad forward (floor), SLQ prefix-cache step, SLQ full-sequence step, LoRA step.

All four run on the same CPU-sized Qwen3-VL (random weights, real classes and processor; ``benchmarks/common.py``)
and the same batch of image/caption pairs (8 images of 256-448 px + 8 captions by default):

- ``no-grad forward``: SLQ embeddings of both sides under ``torch.no_grad()`` (one full forward each: what inference
  costs, and the floor any training step pays);
- ``SLQ prefix-cache``: the default SLQ step (prompt under no_grad into a KV cache, one grad pass of the queries),
  symmetric InfoNCE, backward, AdamW on queries + temperature;
- ``SLQ full-sequence``: the same step with ``training_path="full"`` (the paper's procedure: backward through the
  whole prompt + queries sequence);
- ``LoRA r=8``: peft LoRA on q,k,v,o of the language model, last-token pooling, the same loss, AdamW on the
  adapters (+ temperature).

Timing: one process, ``--rounds`` interleaved rounds (the method order rotates every round) after a warm-up round;
the median of each method is reported (wall time and process CPU time), as a ratio to the no-grad forward.
Interleaving spreads load from other processes on a shared machine over all methods; CPU time is what a step costs
with its cores to itself.

Peak memory: each method runs in its own subprocess (``MALLOC_MMAP_THRESHOLD_`` set so freed tensors go back to the
OS and RSS follows live memory). After a warm-up step, ``malloc_trim`` and a reset of the kernel's peak-RSS counter
(``/proc/self/clear_refs``), one more step runs; "step memory" is the kernel's peak RSS during that step (VmHWM)
minus the RSS just before it: activations, gradients and temporaries, without the weights every method shares.

    .venv/bin/python benchmarks/train_step.py                       # print the table (5-8 minutes on 2 shared cores)
    .venv/bin/python benchmarks/train_step.py --write BENCHMARKS.md # also fill its train-step section
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    build_bench_qwen3_vl,
    call_memory,
    check,
    machine,
    medians,
    memory_subprocess,
    time_interleaved,
    write_section,
)

METHODS = ("no-grad forward", "SLQ prefix-cache", "SLQ full-sequence", "LoRA r=8")
FLOOR = METHODS[0]
SECTION = "train-step"
CAPTIONS = ["a red square on a grey background", "a blue circle in the top left corner", "a green triangle",
            "an animal with nine lives", "the quick brown fox jumps over the lazy dog",
            "a yellow square next to a purple circle", "describe the picture in one sentence", "hello world"]


# ---------------------------------------------------------------------------------------------------------- setup
def _images(num: int, smallest: int, largest: int, seed: int):
    """``num`` RGB scenes with sides spread over [smallest, largest] px (mixed aspect ratios)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(num):
        side = smallest + (largest - smallest) * i // max(1, num - 1)
        other = smallest + (largest - smallest) * ((i * 3) % num) // max(1, num - 1)
        pixels = rng.integers(0, 256, size=(side, other, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _batches(processor, args) -> tuple[dict, dict]:
    from slq_hf.processing import collate, to_items

    images = _images(args.num_pairs, args.min_image_px, args.max_image_px, args.seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.num_pairs)]
    return dict(collate(processor, to_items(images))), dict(collate(processor, to_items(captions)))


def _infonce(left: torch.Tensor, right: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (B, D) normalised embeddings, pairs on the diagonal (CLIP's loss)."""
    logits = logit_scale.clamp(max=4.6052).exp() * left @ right.T  # (B, B)
    target = torch.arange(left.shape[0])
    cross_entropy = torch.nn.functional.cross_entropy
    return (cross_entropy(logits, target) + cross_entropy(logits.T, target)) / 2


def _last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> (B, H): state of each row's last real token, whatever the padding side."""
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)  # (B,)
    return hidden[torch.arange(hidden.shape[0]), last]


def check_paths(slq, batch: dict) -> float:
    """Max |embedding difference| between the two SLQ paths on ``batch``, making sure the prefix cache really ran."""
    import slq_hf.modeling.prefix_cache as prefix_cache

    calls, original = [], prefix_cache.prompt_cache

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    prefix_cache.prompt_cache = counted
    try:
        out = {}
        for path in ("full", "prefix_cache"):
            slq.config.training_path = path
            out[path] = slq.embed(**batch)[0].detach()  # grad enabled, as in a step
    finally:
        prefix_cache.prompt_cache = original
    if len(calls) != 1:
        raise RuntimeError("the prefix-cache path did not run; the benchmark would compare the wrong thing")
    return (out["full"] - out["prefix_cache"]).abs().max().item()


def build_steps(backbone_dir: str, args, methods=METHODS) -> tuple[dict[str, Callable[[], None]], dict]:
    """Load what ``methods`` need from ``backbone_dir`` and return name -> zero-argument step, plus facts."""
    from transformers import AutoModelForImageTextToText

    from slq_hf import SLQModel

    steps: dict[str, Callable[[], None]] = {}
    facts: dict = {}
    slq = None
    if any(m != "LoRA r=8" for m in methods):
        slq = SLQModel.from_backbone(backbone_dir, num_queries=args.num_queries, attn_implementation=args.attn)
        slq.train()
        slq.backbone.eval()  # no dropout in the frozen backbone (it has none at these settings anyway)
        facts["slq_trainable"] = sum(p.numel() for p in slq.parameters() if p.requires_grad)
        images, captions = _batches(slq.processor, args)
        facts["image_prompt_tokens"] = tuple(images["input_ids"].shape)
        facts["caption_prompt_tokens"] = tuple(captions["input_ids"].shape)
        optimizer = torch.optim.AdamW([slq.queries, slq.logit_scale], lr=5e-4)
        if "SLQ prefix-cache" in methods and "SLQ full-sequence" in methods:
            facts["path_diff"] = max(check_paths(slq, images), check_paths(slq, captions))

        def floor():
            with torch.no_grad():
                slq.embed(**images)
                slq.embed(**captions)

        def slq_step(path: str):
            def step():
                slq.config.training_path = path
                optimizer.zero_grad(set_to_none=True)
                loss = _infonce(slq.embed(**images)[0], slq.embed(**captions)[0], slq.logit_scale)
                loss.backward()
                optimizer.step()
            return step

        steps.update({"no-grad forward": floor, "SLQ prefix-cache": slq_step("prefix_cache"),
                      "SLQ full-sequence": slq_step("full")})

    if "LoRA r=8" in methods:
        from peft import LoraConfig, get_peft_model

        backbone = AutoModelForImageTextToText.from_pretrained(backbone_dir, attn_implementation=args.attn).eval()
        if slq is None:
            from transformers import AutoProcessor

            images, captions = _batches(AutoProcessor.from_pretrained(backbone_dir), args)
        lora = get_peft_model(backbone, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        core = backbone.model  # adapters are injected in place; the base model gives last_hidden_state
        logit_scale = torch.nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), learnable as in SLQ
        params = [p for p in lora.parameters() if p.requires_grad]
        facts["lora_trainable"] = sum(p.numel() for p in params)
        lora_optimizer = torch.optim.AdamW(params + [logit_scale], lr=1e-4)

        def embed_last(batch):
            hidden = core(**batch, use_cache=False).last_hidden_state  # (B, L, H)
            return torch.nn.functional.normalize(_last_token(hidden, batch["attention_mask"]).float(), dim=-1)

        def lora_step():
            lora_optimizer.zero_grad(set_to_none=True)
            loss = _infonce(embed_last(images), embed_last(captions), logit_scale)
            loss.backward()
            lora_optimizer.step()

        steps["LoRA r=8"] = lora_step
    return {m: steps[m] for m in methods}, facts


# --------------------------------------------------------------------------------------------------------- memory
def _memory_child(method: str, backbone_dir: str, args) -> None:
    """Subprocess body: one warm-up step, then the kernel's peak RSS over one measured step."""
    torch.set_num_threads(args.threads)
    steps, _ = build_steps(backbone_dir, args, methods=(method,))
    step_mib, peak_rss_mib = call_memory(steps[method])
    print(json.dumps({"method": method, "step_mib": step_mib, "peak_rss_mib": peak_rss_mib}))


def measure_memory(backbone_dir: str, args) -> dict[str, dict]:
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--memory-child", method, "--backbone-dir", backbone_dir,
               *_shared_cli(args)]
        results[method] = memory_subprocess(cmd, args.threads, method)
        print(f"  {method}: step {results[method]['step_mib']:.0f} MiB (peak RSS {results[method]['peak_rss_mib']:.0f}"
              " MiB)", flush=True)
    return results


# ------------------------------------------------------------------------------------------------------- reporting
def table(times: dict[str, dict], memory: dict[str, dict] | None, facts: dict) -> str:
    med = medians(times)
    trainable = {"no-grad forward": "-", "SLQ prefix-cache": facts.get("slq_trainable"),
                 "SLQ full-sequence": facts.get("slq_trainable"), "LoRA r=8": facts.get("lora_trainable")}
    rows = ["| method | wall (s) | × no-grad fwd (wall) | CPU (s) | × no-grad fwd (CPU) | step memory (MiB) "
            "| × LoRA memory | peak RSS (MiB) | trainable params |", "|---|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        mem = memory.get(name) if memory else None
        step_mem = f"{mem['step_mib']:.0f}" if mem else "-"
        vs_lora = f"{mem['step_mib'] / memory['LoRA r=8']['step_mib']:.2f}×" if mem else "-"
        peak = f"{mem['peak_rss_mib']:.0f}" if mem else "-"
        count = trainable[name]
        count = f"{count:,}" if isinstance(count, int) else count
        wall, cpu = med[name]["wall"], med[name]["cpu"]
        rows.append(f"| {name} | {wall:.2f} | {wall / med[FLOOR]['wall']:.2f}× | {cpu:.2f} | "
                    f"{cpu / med[FLOOR]['cpu']:.2f}× | {step_mem} | {vs_lora} | {peak} | {count} |")
    return "\n".join(rows)


def targets(times: dict[str, dict], memory: dict[str, dict] | None) -> list[str]:
    lines = []
    for clock in ("wall", "cpu"):
        med = {n: statistics.median(t[clock]) for n, t in times.items()}
        fast = med["SLQ prefix-cache"]
        label = "wall time" if clock == "wall" else "CPU time"
        lines += [
            check(f"{label}: prefix-cache step ≤ 1.3× the no-grad forward: {fast / med[FLOOR]:.2f}×",
                  fast / med[FLOOR] <= 1.3),
            check(f"{label}: ≥ 1.3× faster than the full-sequence step: {med['SLQ full-sequence'] / fast:.2f}×",
                  med["SLQ full-sequence"] / fast >= 1.3),
            check(f"{label}: ≥ 1.3× faster than the LoRA step: {med['LoRA r=8'] / fast:.2f}×",
                  med["LoRA r=8"] / fast >= 1.3),
        ]
    if memory:
        ratio = memory["SLQ prefix-cache"]["step_mib"] / memory["LoRA r=8"]["step_mib"]
        lines.append(check(f"prefix-cache step memory ≤ ½ of LoRA's: {ratio:.2f}×", ratio <= 0.5))
    return lines


# ------------------------------------------------------------------------------------------------------------- cli
def _shared_cli(args) -> list[str]:
    return ["--text-hidden", str(args.text_hidden), "--text-layers", str(args.text_layers),
            "--num-pairs", str(args.num_pairs), "--min-image-px", str(args.min_image_px),
            "--max-image-px", str(args.max_image_px), "--num-queries", str(args.num_queries),
            "--lora-rank", str(args.lora_rank), "--attn", args.attn, "--threads", str(args.threads),
            "--seed", str(args.seed)]


def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    model = parser.add_argument_group("model and batch")
    model.add_argument("--text-hidden", type=int, default=640, help="width of the Qwen3-VL text model")
    model.add_argument("--text-layers", type=int, default=8, help="decoder layers of the text model")
    model.add_argument("--num-pairs", type=int, default=8, help="image/caption pairs in the batch")
    model.add_argument("--min-image-px", type=int, default=256, help="smallest image side (sides spread up to max)")
    model.add_argument("--max-image-px", type=int, default=448, help="largest image side")
    model.add_argument("--num-queries", type=int, default=16, help="SLQ latent queries N_q")
    model.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (q,k,v,o of the language model)")
    model.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    run = parser.add_argument_group("run")
    run.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds; medians are reported")
    run.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    run.add_argument("--threads", type=int, default=1,
                     help="torch threads (1 keeps timings stable when other processes share the cores)")
    run.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    run.add_argument("--skip-memory", action="store_true", help="skip the per-method memory subprocesses")
    run.add_argument("--write", type=Path, metavar="BENCHMARKS.md",
                     help="also replace the train-step section of this markdown file with the results")
    run.add_argument("--backbone-dir", help="reuse a saved bench backbone instead of building one")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.backbone_dir, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = args.backbone_dir
        if backbone_dir is None:
            backbone_dir = tmp
            build_bench_qwen3_vl(tmp, text_hidden=args.text_hidden, text_layers=args.text_layers, seed=args.seed)
        load_before = os.getloadavg()[0]
        print(f"timing {args.rounds} interleaved rounds ({args.threads} thread(s)) ...", flush=True)
        steps, facts = build_steps(backbone_dir, args)
        times = time_interleaved(steps, args.rounds, args.warmup, collect=True)
        del steps
        gc.collect()
        memory = None
        if not args.skip_memory:
            print("peak memory, one subprocess per method ...", flush=True)
            memory = measure_memory(backbone_dir, args)
        load_after = os.getloadavg()[0]

    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    config = (f"Qwen3-VL, random weights: text {args.text_hidden} wide × {args.text_layers} layers (bench config of "
              f"`benchmarks/common.py`), {args.num_pairs} images of {args.min_image_px}-{args.max_image_px} px + "
              f"{args.num_pairs} captions (prompt ids {facts['image_prompt_tokens']} and "
              f"{facts['caption_prompt_tokens']}), N_q = {args.num_queries}, {args.attn} attention, fp32, "
              f"{args.threads} torch thread(s). Prefix-cache and full-sequence embeddings of this batch agree to "
              f"{facts['path_diff']:.1e} (max abs).")
    body = "\n".join([
        "### One training step: prefix cache vs full sequence vs LoRA",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine(details=True)}; load average {load_before:.1f} → {load_after:.1f} (cores shared with "
        "other jobs).  ",
        f"Setup: {config}",
        "",
        f"Times are medians of {args.rounds} interleaved rounds (order rotating) after {args.warmup} warm-up "
        "round(s), as wall time and as CPU time of the process (the cost with the cores to itself; wall time also "
        "counts waiting for cores other jobs hold), and as ratios against the no-grad forward of the same batch "
        "(both sides, prompt + queries, no grad). Every step is "
        "forward of both sides + symmetric InfoNCE + backward + AdamW. Step memory: each method in its own process, "
        "kernel peak RSS (VmHWM, reset through /proc/self/clear_refs) during one step after a warm-up step, minus the "
        "RSS before it, with MALLOC_MMAP_THRESHOLD_ so freed tensors leave RSS; peak RSS is the whole process "
        "(weights included).",
        "",
        table(times, memory, facts),
        "",
        "Targets:",
        *targets(times, memory),
    ])
    print()
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
        print(f"\nwrote the {SECTION} section of {args.write}")


if __name__ == "__main__":
    main()
