"""Tiny, randomly initialised vision-language backbones for offline tests, the demo and benchmarks.

Each family is built from its REAL transformers config, model and processor classes, with a tiny byte-level BPE
tokenizer made by the ``tokenizers`` library and a chat template. ``build_tiny_backbone`` writes a folder that
loads like a Hub checkpoint (``from_pretrained(path)``), so the same loading code runs in tests as for real models.

Add a family: write a ``family() -> (model, processor)`` builder in a sibling module (``tiny_qwen``, ``tiny_llava``,
``tiny_others``) and name it in the family's ``BackboneSpec`` row (``tiny="module:function"``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..modeling.backbones import BACKBONES

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
    """A tiny backbone: ``builder`` names a ``module:function`` in this package returning (model, processor)."""

    model_type: str
    builder: str

    def build(self) -> tuple[torch.nn.Module, object]:
        """Random weights (seed them first); the builder module is imported lazily, breaking the import cycle."""
        module, name = self.builder.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)()


# One tiny twin per supported family, named by the family's BackboneSpec row (``tiny="module:function"``).
TINY_FAMILIES: dict[str, TinyFamily] = {family: TinyFamily(family, spec.tiny) for family, spec in BACKBONES.items()
                                        if spec.tiny is not None}


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
