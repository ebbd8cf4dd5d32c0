"""Image and text budgets on a real-width Qwen3-VL-2B twin: image tokens, time and memory per photo size under the
default budget vs the backbone's own; a mixed call (texts + one 1080p photo) with count vs token-budget batching;
the SLQ folder size with and without a bundled processor.

The twin is built in code: Qwen3-VL-2B-Instruct's widths, heads, head_dim, rope, DeepStack, vocabulary size
(151,936 rows), real special-token ids (a byte-level BPE of 151,643 synthetic tokens + the 26 added tokens at their
real ids, so tokenizer files have the real size) and image-processor settings; random weights; only the depth cut
(``--text-layers``, ``--vision-layers``). Real depth (28 text layers, 24 vision blocks) costs about 12-14x the time.

    nice -n 10 python benchmarks/budgets.py --write
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, status_kib, write_section  # noqa: E402

PHOTO_SIZES = [(800, 600), (1920, 1080), (4000, 3000), (6000, 4000)]
# Timing every size at the backbone's own budget would take ~9 min for the two largest alone (issue measurements:
# 187 s and 331 s); those two are reported by token count only unless --time-own-large.
OWN_TIMED = {(800, 600), (1920, 1080)}
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
         "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
         "</tool_response>", "<think>", "</think>"]
BASE_VOCAB, ROWS = 151_643, 151_936


def real_size_tokenizer(seed: int = 0):
    """Byte-level BPE with Qwen's vocabulary size and added-token ids (151,643 + 26), synthetic merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokens, merges, rng = list(vocab), [], random.Random(seed)
    while len(vocab) < BASE_VOCAB:
        a, b = tokens[rng.randrange(min(len(tokens), 4096))], tokens[rng.randrange(len(tokens))]
        if len(a) + len(b) <= 12 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append((a, b))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_twin(text_layers: int, vision_layers: int):
    """(model, processor): Qwen3-VL-2B-Instruct at its real widths, ``text_layers`` / ``vision_layers`` deep."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from slq_hf.testing.tiny_qwen import _qwen_template

    torch.manual_seed(0)
    tokenizer = real_size_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ADDED}
    assert ids["<|image_pad|>"] == 151_655 and len(tokenizer) == 151_669
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=ROWS, hidden_size=2048, intermediate_size=6144, num_hidden_layers=text_layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262_144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=151_643, eos_token_id=151_645),
        vision_config=dict(depth=vision_layers, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=list(range(vision_layers))[-1:]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": 65_536, "longest_edge": 16_777_216},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                                 chat_template=_qwen_template())
    return model, processor


def measured(fn) -> tuple[float, float, object, float]:
    """(wall seconds, MiB of peak RSS above the RSS before the call, result, CPU seconds) of one call. CPU seconds
    (all threads of this process) are what the work costs with the cores to itself; on a loaded machine wall time
    also counts waiting for cores."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, so the peak is this call's
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall, (status_kib("VmHWM") - before) / 1024, out, cpu


def photo_files(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """JPEG photos of the given sizes (a grey picture with a coloured square and noise, quality 90)."""
    from PIL import Image

    paths = []
    for width, height in sizes:
        image = Image.merge("RGB", [Image.effect_noise((width, height), 40 + 10 * i) for i in range(3)])
        image.paste((200, 40, 40), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        path = folder / f"photo_{width}x{height}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=2, help="text decoder layers of the twin (real: 28)")
    parser.add_argument("--vision-layers", type=int, default=2, help="vision blocks of the twin (real: 24)")
    parser.add_argument("--texts", type=int, default=31, help="short texts in the mixed call (plus one photo)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the mixed call")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="token budget of the mixed call")
    parser.add_argument("--time-own-large", action="store_true",
                        help="also time 4000x3000 and 6000x4000 at the backbone's own budget (~9 min more)")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from slq_hf import SLQModel
    from slq_hf.modeling.budgets import image_tokens

    print("building the twin ...", flush=True)
    backbone, processor = build_twin(args.text_layers, args.vision_layers)
    model = SLQModel.from_backbone(backbone, num_queries=40, processor=processor)  # "auto" budget: 4-1,800 tokens
    own = SLQModel.from_backbone(backbone, num_queries=40, processor=processor, max_image_tokens=None,
                                 min_image_tokens=None)
    own.load_state_dict(model.trainable_state_dict())
    budget = (model.config.min_image_tokens, model.config.max_image_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="slq_budgets_"))
    photos = photo_files(tmp, PHOTO_SIZES)
    warm = photo_files(tmp, [(320, 240)])[0]
    model.encode(["warm up", warm])  # one-off costs (first vision pass, allocator growth) stay out of the rows
    own.encode([warm])
    rows = []
    for size, path in zip(PHOTO_SIZES, photos, strict=True):
        row = {"size": size}
        for name, m in (("default", model), ("own", own)):
            row[f"{name}_tokens"] = image_tokens(m.processor, *size)
            if name == "own" and size not in OWN_TIMED and not args.time_own_large:
                continue
            wall, mib, _, cpu = measured(lambda m=m, path=path: m.encode([path]))
            row[f"{name}_s"], row[f"{name}_cpu"], row[f"{name}_mib"] = wall, cpu, mib
            print(name, size, row[f"{name}_tokens"], f"{wall:.1f} s", f"{cpu:.1f} CPU-s", f"{mib:.0f} MiB", flush=True)
        rows.append(row)

    texts = [f"a photo of {n} {word} on a table near the window" for n, word in
             zip(range(args.texts), ["cats", "dogs", "cups", "books", "plants", "shoes", "keys"] * 10)]
    inputs = texts + [photos[1]]  # one 1920x1080 photo
    runs = {}
    for name, kwargs in (("count", {}), ("tokens", {"max_batch_tokens": args.max_batch_tokens})):
        runs[name] = measured(lambda kwargs=kwargs: model.encode(inputs, batch_size=args.batch_size, **kwargs))
        print(name, f"{runs[name][0]:.1f} s", f"{runs[name][3]:.1f} CPU-s", f"{runs[name][1]:.0f} MiB", flush=True)
    difference = float((runs["count"][2] - runs["tokens"][2]).abs().max())

    model.config.backbone_name_or_path, model.config.backbone_revision = "Qwen/Qwen3-VL-2B-Instruct", "0" * 40
    sizes = {}
    for name, bundle in (("bundled", True), ("small", None)):
        model.save_pretrained(tmp / name, bundle_processor=bundle)
        sizes[name] = folder_mib(tmp / name)
    queries_kib = (tmp / "small" / "model.safetensors").stat().st_size / 1024
    report(args, rows, runs, difference, sizes, queries_kib, budget)


def report(args, rows, runs, difference, sizes, queries_kib, budget) -> None:
    def cell(row, name, key, fmt):
        return fmt.format(row[f"{name}_{key}"]) if f"{name}_{key}" in row else "not timed"

    def seconds(row, name):
        return f"{row[name + '_s']:.1f} ({row[name + '_cpu']:.1f})" if f"{name}_s" in row else "not timed"

    lines = [
        f"Command: `nice -n 10 python benchmarks/budgets.py --write` ({machine()}). Twin of Qwen3-VL-2B-Instruct: "
        f"real widths/heads/vocabulary/processor settings, {args.text_layers} text layers and "
        f"{args.vision_layers} vision blocks (real depth costs ~12-14x the time), fp32, random weights, 40 queries. "
        "Memory: peak RSS above the RSS before the call. One run on a shared, loaded machine: read ratios, not "
        "absolute times.",
        "",
        f"Per photo (one `encode([path])`), default budget ({budget[0]}-{budget[1]:,} image tokens, "
        "Qwen3-VL-Embedding's 4,096-1,843,200 pixels) vs the backbone's own (65,536-16,777,216 pixels):",
        "",
        "| photo | tokens default | s (CPU-s) default | MiB default | tokens own | s (CPU-s) own | MiB own |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        w, h = row["size"]
        lines.append(f"| {w}x{h} | {row['default_tokens']:,} | {seconds(row, 'default')} | "
                     f"{cell(row, 'default', 'mib', '{:,.0f}')} | {row['own_tokens']:,} | "
                     f"{seconds(row, 'own')} | {cell(row, 'own', 'mib', '{:,.0f}')} |")
    count, tokens = runs["count"], runs["tokens"]
    lines += [
        "",
        f"Mixed call: {args.texts} short texts + one 1920x1080 photo, batch_size={args.batch_size}, default budget. "
        f"Count batching {count[0]:.1f} s ({count[3]:.1f} CPU-s) / {count[1]:,.0f} MiB; token-budget batching "
        f"(max_batch_tokens={args.max_batch_tokens}) {tokens[0]:.1f} s ({tokens[3]:.1f} CPU-s) / {tokens[1]:,.0f} "
        f"MiB: **{count[3] / tokens[3]:.2f}x less CPU time ({count[0] / tokens[0]:.2f}x wall), "
        f"{count[1] / max(tokens[1], 1):.2f}x less peak memory**; embeddings equal to {difference:.1e}.",
        "",
        f"SLQ folder for a Hub backbone pinned to a revision: {sizes['small']:.2f} MiB (queries {queries_kib:.0f} KB, "
        f"model code, configs, sentence-transformers files); with `bundle_processor=True` {sizes['bundled']:.2f} MiB "
        "(the tokenizer files of a 151,669-token vocabulary are the difference; this twin's merges are synthetic, "
        "and a folder with the real Qwen3-VL tokenizer measured 6.7 MB). Own-budget sizes marked 'not timed' were "
        "measured earlier at 187 s / 331 s, +3 / +4 GB on the same twin; `--time-own-large` includes them.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "budgets", "## Image and text budgets\n\n"
                      + body)


if __name__ == "__main__":
    main()
