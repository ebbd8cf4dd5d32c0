"""Cross-device negatives through the plain Trainer: `torchrun --nproc_per_node 2` on the CPU (gloo) must give the
loss and the query gradients of ONE process on the concatenated batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from slq_hf import SLQModel

WORKER = Path(__file__).with_name("ddp_trainer_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_trainer_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.distributed
def test_two_process_trainer_step_equals_one_process_on_concatenated_batch(tiny_backbone_path, tmp_path):
    backbone = tiny_backbone_path("qwen3_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               backbone, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["batch_rows"] for r in ranks] == [[3], [3]]  # each rank really saw only half of the global batch

    # Independent reference: one process, all 6 pairs in one batch, plain forward + backward.
    from slq_hf.training import SLQDataCollator

    worker = _worker_module()
    model = SLQModel.from_backbone(backbone, num_queries=worker.NUM_QUERIES)
    out = model(**SLQDataCollator(model.processor)(worker.make_pairs()))
    out.loss.backward()

    for rank in ranks:
        assert abs(rank["loss"][0] - out.loss.item()) <= 1e-5
        grad = torch.tensor(rank["queries_grad"])
        assert torch.linalg.norm(grad - model.queries.grad) <= 1e-4 * torch.linalg.norm(model.queries.grad)
        assert rank["logit_scale_grad"] == pytest.approx(model.logit_scale.grad.item(), rel=1e-4, abs=1e-7)


@pytest.mark.distributed
@pytest.mark.parametrize("micro", [None, 2])
def test_a_batch_that_lost_every_example_on_one_rank_is_skipped_on_both(tiny_backbone_path, tmp_path, micro):
    """Rank 1's first batch is all unreadable images: both ranks skip step 1 together (nobody waits in a
    collective), train step 2, and end with the same queries; plain and GradCache steps."""
    backbone = tiny_backbone_path("qwen3_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("ddp_skip_worker.py")), backbone, str(tmp_path)]
    done = subprocess.run(command + ([str(micro)] if micro else []), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["queries"] == ranks[1]["queries"]
    assert ranks[0]["queries"] != ranks[0]["initial"]  # step 2 trained
    assert "could not be loaded" in done.stderr and "another process's batch lost every example" in done.stderr


@pytest.mark.distributed
def test_slq_hf_train_under_torchrun_equals_one_process_and_exits_cleanly(tiny_backbone_path, tmp_path):
    """`torchrun --nproc_per_node 2 slq-hf train` with 2 pairs per device == `slq-hf train` with 4 on one process
    (one step whose global batch is the whole data set), and exits 0 (the CLI closes the gloo group it trained in:
    left open, its threads can abort a finished run at exit)."""
    from slq_hf.cli import main

    backbone = tiny_backbone_path("qwen3_vl")
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 20)]
    lines = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"square number {i} in colour {colour}"}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ["--backbone", backbone, "--train-data", str(data), "--num-queries", "2", "--max-steps", "1",
              "--warmup", "0", "--lr", "1e-3", "--use-cpu", "--seed", "0"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "slq_hf.cli", "train", *common, "--batch-size", "2", "--output-dir",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "terminate called" not in two.stderr
    assert main(["train", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0

    summaries = [json.loads((tmp_path / name / "training_summary.json").read_text()) for name in ("one", "two")]
    assert [s["processes"] for s in summaries] == [1, 2]
    assert [s["contrastive_batch"] for s in summaries] == [4, 4]
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-5)
    one, two_model = (SLQModel.from_pretrained(tmp_path / name) for name in ("one", "two"))
    initial = SLQModel.from_backbone(backbone, num_queries=2).queries
    assert (one.queries - initial).abs().min() > 5e-4  # Adam's first step moved every entry by about the lr
    torch.testing.assert_close(two_model.queries, one.queries, rtol=0, atol=1e-6)
