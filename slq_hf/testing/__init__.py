"""Test bed: tiny backbones built from real transformers classes, for offline tests, the demo and benchmarks."""

from .tiny_backbones import TINY_FAMILIES, build_tiny_backbone, make_tokenizer

__all__ = ["TINY_FAMILIES", "build_tiny_backbone", "make_tokenizer"]
