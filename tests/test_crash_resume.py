"""Training loses nothing: `slq-hf train` killed with SIGKILL (mid-epoch, mid-checkpoint, or at a random moment) and
resumed with `--resume-from-checkpoint latest` ends with exactly the queries of an uninterrupted run.

The killed runs are real subprocesses that die by SIGKILL (no cleanup, no exception handlers run). The uninterrupted
reference and the resumed runs execute the same CLI in this process, which is quicker than a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from slq_hf.cli import main
from slq_hf.modeling import checkpoint as slq_checkpoint
from slq_hf.training.trainer import STAGING_DIR

NUM_PAIRS, BATCH, EPOCHS, SAVE_STEPS = 12, 4, 10, 2  # 3 steps an epoch, 30 steps, a checkpoint every 2 steps
TOTAL_STEPS = NUM_PAIRS // BATCH * EPOCHS

# Runs the real CLI in a fresh interpreter and SIGKILLs itself at a chosen point: "step" = before the optimizer
# step that follows global step N; "saving" = while checkpoint-N is being written (model and optimizer files are on
# disk, the RNG and trainer state are not yet); "none" = never (the test kills it from outside).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import transformers
    from slq_hf.training.trainer import SLQTrainer

    torch.set_num_threads(1)
    mode, step = sys.argv[1], int(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "step":
        training_step = SLQTrainer.training_step

        def killing_training_step(self, *args, **kwargs):
            if self.state.global_step == step:
                die()
            return training_step(self, *args, **kwargs)

        SLQTrainer.training_step = killing_training_step
    elif mode == "saving":
        save_rng_state = transformers.Trainer._save_rng_state

        def killing_save_rng_state(self, output_dir):
            if self.state.global_step == step:
                die()
            return save_rng_state(self, output_dir)

        transformers.Trainer._save_rng_state = killing_save_rng_state
    from slq_hf.cli import main

    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_data")
    lines = []
    rng = random.Random(0)
    for index in range(NUM_PAIRS):
        colour = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        image.paste(colour, (16, 16, 48, 48))
        image.save(root / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "text": f"a square of colour {colour[0]} {colour[1]}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def _argv(backbone: str, data: Path, out: Path) -> list[str]:
    return ["train", "--backbone", backbone, "--train-data", str(data), "--output-dir", str(out), "--num-queries", "4",
            "--epochs", str(EPOCHS), "--lr", "1e-2", "--batch-size", str(BATCH), "--save-steps", str(SAVE_STEPS),
            "--logging-steps", "1000", "--seed", "0", "--use-cpu"]


def _start(mode: str, step: int, argv: list[str], tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), mode, str(step), *argv], env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _queries(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _assert_complete(checkpoint: Path) -> None:
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"):
        assert (checkpoint / name).is_file(), f"{checkpoint} lacks {name}"
    json.loads((checkpoint / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_backbone_path, data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(_argv(tiny_backbone_path("qwen3_vl"), data, out)) == 0
    return _queries(out)


def test_sigkill_then_resume_equals_uninterrupted(tiny_backbone_path, data, reference, tmp_path, capsys):
    backbone = tiny_backbone_path("qwen3_vl")
    runs = {
        # mid-epoch: epoch 2 is steps 4-6, checkpoint-4 is the last one on disk
        "mid-epoch": ("step", 5, 4),
        # mid-checkpoint: checkpoint-6 half written; the last complete one is checkpoint-4
        "mid-checkpoint": ("saving", 6, 4),
        # from outside, at a random moment: shortly after a randomly chosen checkpoint appears, whatever the process
        # is doing then (a step, the next checkpoint's files...), with at least 4 steps still to go
        "random": ("none", -1, None),
    }
    processes = {name: _start(mode, step, _argv(backbone, data, tmp_path / name), tmp_path)
                 for name, (mode, step, _) in runs.items()}
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    after, delay = rng.randrange(SAVE_STEPS, TOTAL_STEPS - 4, SAVE_STEPS), rng.uniform(0.0, 0.05)
    where = f"random kill {delay:.3f}s after checkpoint-{after} (seed {seed})"
    deadline = time.monotonic() + 240
    while not (tmp_path / "random" / f"checkpoint-{after}").exists():
        assert processes["random"].poll() is None, f"{where}: " + processes["random"].communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{where}: checkpoint not reached within 4 minutes"
        time.sleep(0.005)
    time.sleep(delay)
    processes["random"].send_signal(signal.SIGKILL)
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, f"{name}: exit {process.returncode}\n{stderr[-3000:]}"

    for name, (_, _, expected_last) in runs.items():
        out = tmp_path / name
        assert not (out / "model.safetensors").exists(), f"{name}: killed only after the final save ({where})"
        last = get_last_checkpoint(str(out))
        assert last is not None, name
        if expected_last is not None:
            assert Path(last).name == f"checkpoint-{expected_last}", (name, last)
        for checkpoint in out.glob("checkpoint-*"):
            _assert_complete(checkpoint)  # every visible checkpoint is whole; partial ones stay in the staging dir
        assert int(Path(last).name.split("-")[1]) < TOTAL_STEPS, f"{name}: {where}: killed too late"

        assert main([*_argv(backbone, data, out), "--resume-from-checkpoint", "latest"]) == 0
        resumed = _queries(out)
        assert set(resumed) == set(reference)
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), f"{name} ({where}): {key} differs"
        assert not (out / STAGING_DIR).exists()
    capsys.readouterr()


def test_crash_while_saving_leaves_no_visible_checkpoint(tiny_backbone_path, data, tmp_path, monkeypatch):
    """In-process twin of the mid-checkpoint kill, plus its negative control: without the staging folder (the plain
    Trainer's way) the same crash leaves a half-written checkpoint-4 that `latest` would pick and fail on."""
    import transformers

    from slq_hf.training.trainer import SLQTrainer

    class Crash(Exception):
        pass

    save_rng_state = transformers.Trainer._save_rng_state

    def crashing(self, output_dir):
        if self.state.global_step == 4:
            raise Crash
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", crashing)
    backbone = tiny_backbone_path("qwen3_vl")
    with pytest.raises(Crash):
        main(_argv(backbone, data, tmp_path / "atomic"))
    assert Path(get_last_checkpoint(str(tmp_path / "atomic"))).name == "checkpoint-2"
    assert not (tmp_path / "atomic" / "checkpoint-4").exists()

    monkeypatch.setattr(SLQTrainer, "_save_checkpoint", transformers.Trainer._save_checkpoint)
    with pytest.raises(Crash):
        main(_argv(backbone, data, tmp_path / "plain"))
    half = tmp_path / "plain" / "checkpoint-4"
    assert get_last_checkpoint(str(tmp_path / "plain")) == str(half)
    assert (half / "model.safetensors").is_file() and not (half / "trainer_state.json").exists()


def test_model_safetensors_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the weights file is written leaves the previous file intact and no temporary file behind."""
    target = tmp_path / "model.safetensors"
    old = {"queries": torch.ones(2, 3)}
    slq_checkpoint.save_tensors(old, target)

    def crash_before_rename(fileno):  # the new bytes are in the temporary file, the rename has not happened
        raise KeyboardInterrupt

    monkeypatch.setattr(slq_checkpoint.os, "fsync", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        slq_checkpoint.save_tensors({"queries": torch.zeros(2, 3)}, target)
    assert torch.equal(load_file(target)["queries"], old["queries"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
