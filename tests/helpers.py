"""Helpers several test modules share: synthetic images, sharper tiny backbones, a prompt-pass counter, README runs.

Plain functions, imported as ``from helpers import ...`` (pytest puts this folder on ``sys.path``); fixtures live
in ``conftest.py``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def scene(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    """A grey ``width`` x ``height`` picture with a ``colour`` square in the middle half."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(colour, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


@torch.no_grad()
def sharpen_attention(backbone: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale every q/k projection so attention logits are O(1) instead of ~0.02 (random init, std 0.02).

    Near-uniform attention hardly depends on positions or padding, so a wrong position rule or a leaking pad would
    move the embeddings by only ~1e-5 on some tiny backbones (Qwen2-VL). Trained models attend sharply; so do these
    after scaling, which makes both equivalence checks and negative controls stricter.
    """
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
            module.weight.mul_(factor)


def count_prompt_passes(monkeypatch) -> list[int]:
    """Spy on ``prefix_cache.prompt_cache``: the returned list grows by one per prompt pass into a KV cache."""
    import slq_hf.modeling.prefix_cache as prefix_cache

    calls: list[int] = []
    original = prefix_cache.prompt_cache

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_cache, "prompt_cache", spy)
    return calls


def run_readme_example(section: str, cwd: Path, monkeypatch) -> None:
    """Run the first Python block of the README's ``section`` as written, in ``cwd``.

    The README promises its examples run; executing them here keeps them from drifting away from the code.
    """
    readme = README.read_text(encoding="utf8")
    body = readme.split(f"<!-- section:{section} -->", 1)[1].split(f"<!-- /section:{section} -->", 1)[0]
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(cwd)
    exec(compile(code, f"README.md:{section}", "exec"), {"__name__": "readme_example"})


def stop_at_step(step: int):
    """A Trainer callback that ends training after ``step`` (a run "killed" mid-epoch, for resume tests)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAt()


def sparse_query_file(path: Path, num_queries: int, hidden: int = 64) -> Path:
    """A valid safetensors header for (num_queries, hidden) float32 queries over a sparse (unallocated) data block:
    a file that declares gigabytes while taking ~0 bytes on disk, for loading-limit tests."""
    nbytes = num_queries * hidden * 4
    header = json.dumps({"queries": {"dtype": "F32", "shape": [num_queries, hidden], "data_offsets": [0, nbytes]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + nbytes)
    return path


class SwitchRecorder:
    """Stands in for a fast tokenizer's Rust backend: delegates everything, records each value the process-wide
    ``encode_special_tokens`` switch is set to (a setting every thread using the tokenizer sees)."""

    def __init__(self, backend):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "values", [])
        object.__setattr__(self, "used", set())

    def __getattr__(self, name):
        if name in ("_backend", "used"):  # not set yet (copy.deepcopy builds the copy without __init__)
            raise AttributeError(name)
        self.used.add(name)
        return getattr(self._backend, name)

    def __setattr__(self, name, value):
        if name == "encode_special_tokens":
            self.values.append(value)
        setattr(self._backend, name, value)
