"""Shared pieces of the benchmark scripts: the CPU-sized Qwen3-VL bench backbone, interleaved timing, per-call peak
memory in a subprocess, and the markdown reporting (machine line, target lines, BENCHMARKS.md sections)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def build_bench_qwen3_vl(out_dir: str | Path | None = None, text_hidden: int = 640, text_layers: int = 8,
                         vision_hidden: int = 256, vision_layers: int = 4, seed: int = 0):
    """A CPU-sized Qwen3-VL (random weights, the real classes and processor) for speed/memory measurements.

    Defaults follow DESIGN.md's bench config: text 640 wide x 8 layers. Returns (model, processor); saved to
    ``out_dir`` when given so loaders (dtype / 4-bit) can be measured from disk like a real checkpoint.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from slq_hf.testing.tiny_qwen import QWEN_SPECIALS, _qwen_image_processor, _qwen_template, _qwen_tokenizer

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    heads, head_dim = text_hidden // 64, 64
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2),
                         head_dim=head_dim, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8],
                                          "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                           num_heads=vision_hidden // 64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=text_hidden, num_position_embeddings=256, deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = _qwen_image_processor(16)
    image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 448 * 448}
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                                 chat_template=_qwen_template())
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


# ---------------------------------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], object], rounds: int = 5) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls (seconds)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_and_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn`` once; returns its (wall, CPU) seconds.

    CPU time (``time.process_time``, all threads of this process) is what the work costs with the cores to itself;
    wall time also counts waiting for cores that other jobs on a shared machine hold. The benchmarks report both.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def rotation(names: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index`` of an interleaved run: ``names`` rotated by one place per round.

    Every variant takes every slot in turn, so a burst of load from other processes is spread over all of them
    instead of landing on whichever always runs first.
    """
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def time_interleaved(steps: dict[str, Callable[[], object]], rounds: int, warmup: int,
                     collect: bool = False) -> dict[str, dict[str, list[float]]]:
    """Run every step once a round, ``warmup`` untimed rounds then ``rounds`` timed ones, order rotating each round.

    Returns name -> {"wall": [s per timed round], "cpu": [s per timed round]}. ``collect`` runs the garbage
    collector (untimed) before each step, so one step's garbage is not collected on the next step's clock.
    """
    names = list(steps)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(warmup + rounds):
        for name in rotation(names, r):
            if collect:
                gc.collect()
            wall, cpu = wall_and_cpu(steps[name])
            if r >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
        if r >= warmup:
            print(f"  round {r - warmup + 1}/{rounds}: " + ", ".join(
                f"{n} {times[n]['wall'][-1]:.2f}s wall / {times[n]['cpu'][-1]:.2f}s cpu" for n in names), flush=True)
    return times


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """name -> {"wall": median, "cpu": median} of what :func:`time_interleaved` returns."""
    return {name: {clock_name: statistics.median(values) for clock_name, values in t.items()}
            for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------------- memory
# Freed tensors above 128 KiB are unmapped at once instead of staying in malloc's heap, so RSS follows live memory.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def call_memory(fn: Callable[[], object]) -> tuple[float, float]:
    """Peak memory of one call of ``fn`` after a warm-up call: (MiB above the RSS before it, peak RSS in MiB).

    Meant for a subprocess that does nothing else (see :func:`memory_subprocess`). The warm-up call takes the
    one-off allocations (optimizer state, lazy initialisation); then ``malloc_trim`` and a reset of the kernel's
    peak-RSS counter (``/proc/self/clear_refs``), so VmHWM afterwards is the peak during the measured call alone.
    """
    fn()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    peak = status_kib("VmHWM")
    return (peak - before) / 1024, peak / 1024


def memory_subprocess(cmd: list[str], threads: int, label: str) -> dict:
    """Run one memory-measuring child (``cmd``) and return the JSON object of its last stdout line.

    Each variant gets its own process so peak RSS numbers do not mix; the child runs with
    :data:`MEMORY_CHILD_ENV` and ``threads`` OpenMP threads.
    """
    env = dict(os.environ, **MEMORY_CHILD_ENV, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {label!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- reporting
def check(text: str, ok: bool) -> str:
    """One line of a results section's target list."""
    return f"- {'met' if ok else 'MISSED'}: {text}"


def machine(details: bool = False) -> str:
    """CPU model, visible cores and torch version (``details``: also the kernel release and Python version)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"Linux {platform.release()}, Python {platform.python_version()}, " if details else ""
    return f"{cpu}, {os.cpu_count()} cores visible, {system}torch {torch.__version__}"


def write_section(path: Path, section: str, body: str) -> None:
    """Replace only the text between the ``section`` markers of ``path`` (BENCHMARKS.md); nothing else changes."""
    start, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    text = path.read_text(encoding="utf8")  # re-read right before writing: others edit other sections
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}", encoding="utf8")
