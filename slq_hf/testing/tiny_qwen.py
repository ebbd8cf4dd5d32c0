"""Tiny Qwen-VL backbones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ChatML prompts, M-RoPE, dynamic-resolution images.

All three share the Qwen2-VL image processor (patch 14 or 16, merge 2) with a small pixel budget, so a 48x40 image
becomes a 2x1 or 2x2 merged grid: a handful of image tokens per prompt.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from .tiny_backbones import CHATML_TEMPLATE, make_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# Text tower shared by Qwen2-VL and Qwen2.5-VL: head_dim 16, so mrope_section sums to head_dim / 2 = 8.
_QWEN2_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_template() -> str:
    return CHATML_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")


def _qwen_image_processor(patch_size: int, merge: int = 2):
    from transformers import Qwen2VLImageProcessor

    unit = patch_size * merge
    # Small pixel budget: a 64x64 image becomes a 2x2 merged grid, so tests stay fast.
    return Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge, temporal_patch_size=2,
                                 size={"shortest_edge": unit * unit, "longest_edge": (4 * unit) ** 2})


def _special_ids(tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen2_text(tokenizer) -> dict:
    # The real config's bos id (151643) lies outside a tiny vocabulary; Qwen2-VL has no BOS in its prompts anyway.
    return dict(_QWEN2_TEXT, vocab_size=len(tokenizer), bos_token_id=None,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=_qwen2_text(tokenizer),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_special_ids(tokenizer),
    )
    model = Qwen2VLForConditionalGeneration(config)
    processor = Qwen2VLProcessor(image_processor=_qwen_image_processor(14), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
                                 chat_template=_qwen_template())
    return model, processor


def qwen2_5_vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_qwen2_text(tokenizer),
        # window_size 56 px = a 2x2 window of merged tokens, so the windowed-attention path really runs on a 2x2+ grid.
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        **_special_ids(tokenizer),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(image_processor=_qwen_image_processor(14), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
                                    chat_template=_qwen_template())
    return model, processor


def qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_special_ids(tokenizer),
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config)
    processor = Qwen3VLProcessor(image_processor=_qwen_image_processor(16), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                                 chat_template=_qwen_template())
    return model, processor
