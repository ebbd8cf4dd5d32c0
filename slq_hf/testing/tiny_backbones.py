"""Tiny, randomly initialised vision-language backbones for offline tests, the demo and benchmarks.

Each family is built from its REAL transformers config, model and processor classes, with a tiny byte-level BPE
tokenizer made by the ``tokenizers`` library and a chat template. ``build_tiny_backbone`` writes a folder that
loads like a Hub checkpoint (``from_pretrained(path)``), so the same loading code runs in tests as for real models.

Add a family: write a ``_family_name(tokenizer_factory) -> (model, processor)`` builder and one ``TINY_FAMILIES``
row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "a red square on a grey background", "a blue circle in the top left corner", "a green triangle",
    "what animal is this? describe the image.", "an animal with nine lives", "the quick brown fox jumps over",
    "user assistant system describe the picture in one sentence", "hello world 0 1 2 3 4 5 6 7 8 9",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{IMAGE}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(special_tokens: list[str], vocab_size: int = 384, **tokenizer_kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; special tokens get the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokenizer_kwargs)


@dataclass(frozen=True)
class TinyFamily:
    """A tiny backbone builder: returns (model, processor) with random weights for a fixed seed."""

    model_type: str
    build: Callable[[], tuple[torch.nn.Module, object]]


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


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


def _qwen3_vl():
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
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config)
    processor = Qwen3VLProcessor(image_processor=_qwen_image_processor(16), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                                 chat_template=_qwen_template())
    return model, processor


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen3_vl": TinyFamily("qwen3_vl", _qwen3_vl),
}


def build_tiny_backbone(family: str, out_dir: str | Path | None = None, seed: int = 0):
    """Build the tiny ``family`` backbone with a fixed seed.

    Returns (model, processor); with ``out_dir`` both are also saved there (fp32 safetensors + processor files) so
    ``from_pretrained(out_dir)`` / ``SLQModel.from_backbone(out_dir)`` load it like a Hub checkpoint.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"No tiny backbone for {family!r}; available: {sorted(TINY_FAMILIES)}.")
    torch.manual_seed(seed)
    model, processor = TINY_FAMILIES[family].build()
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor
