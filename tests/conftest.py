"""Shared fixtures: tiny backbones are built once per session (per xdist worker) and loaded fresh per test."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores are shared between xdist workers; one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_backbone_path(tmp_path_factory):
    """Callable family -> folder holding that tiny backbone (model + processor), built once per session."""
    from slq_hf.testing.tiny_backbones import build_tiny_backbone

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            build_tiny_backbone(family, out)
            cache[family] = str(out)
        return cache[family]

    return get
