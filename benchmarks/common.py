"""Shared pieces of the benchmark scripts: the CPU-sized Qwen3-VL bench backbone and timing helpers."""

from __future__ import annotations

import statistics
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


def median_time(fn: Callable[[], object], rounds: int = 5) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls (seconds)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
