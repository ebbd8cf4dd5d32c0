"""Shared fixtures: tiny backbones are built once per session (per xdist worker) and loaded fresh per test."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_packaging.py runs the suite's warning rules on sample tests

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


# transformers reports some deprecations through its logger (e.g. "`past_key_values`/`cache_params` are deprecated"),
# where pytest's filterwarnings (pyproject.toml) cannot see them: a test whose call logs one fails, like a
# FutureWarning would. `@pytest.mark.allow_deprecation_log(reason)` exempts a test whose notice comes from another
# library's own code.
DEPRECATION_LOG = re.compile(r"deprecated|will be removed|no longer supported", re.IGNORECASE)
# Notices about the environment, not about a call of ours: transformers decodes image PATHS handed to
# sentence-transformers' own preprocessing with torchvision and announces torchcodec (which needs FFmpeg) as its
# replacement. SLQModel.encode decodes with PIL and never reaches it.
NOT_OUR_CALL = re.compile(r"Image decoding with `torchvision` is deprecated")


class _DeprecationRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if DEPRECATION_LOG.search(message) and not NOT_OUR_CALL.search(message):
            self.messages.append(f"{record.name}: {message.strip()}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    handler = _DeprecationRecords()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        result = yield
    finally:
        logger.removeHandler(handler)
    if handler.messages and item.get_closest_marker("allow_deprecation_log") is None:
        pytest.fail("transformers logged a deprecation on this test's path (use what the installed version "
                    "expects):\n  " + "\n  ".join(dict.fromkeys(handler.messages)), pytrace=False)
    return result


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that only writes a marker file: any attempt to run Ghostscript leaves the marker."""
    from PIL import EpsImagePlugin

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs_was_run"
    script = bin_dir / "gs"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL caches the lookup: make it look again
    return marker
