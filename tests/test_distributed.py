"""Cross-device negatives through the plain Trainer: `torchrun --nproc_per_node 2` on the CPU (gloo) must give the
loss and the query gradients of ONE process on the concatenated batch."""

from __future__ import annotations

import importlib.util
import json
import math
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


def _skip_worker(backbone: str, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("ddp_skip_worker.py")), backbone, str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.parametrize("micro", ["0", "1"])
def test_evaluation_with_unreadable_examples_on_some_ranks_skips_them(tiny_backbone_path, tmp_path, micro):
    """Under torchrun, an eval batch that lost one example on one rank (or every example) used to end the run in a
    collective mismatch (gloo: "Received data size doesn't match expected size", SIGABRT): the ranks' predictions
    differed in rows. The unreadable examples are now left out as in one process: 4 pairs loaded, two hits (same
    text) and two misses (rows 3 and 6 swap texts): R@1 = 50 both ways, with the last batch's padding dropped."""
    ranks = _skip_worker(tiny_backbone_path("qwen3_vl"), tmp_path, micro, "eval")
    for rank in ranks:
        assert rank["metrics"]["eval_query2positive_R@1"] == pytest.approx(50.0)
        assert rank["metrics"]["eval_positive2query_R@1"] == pytest.approx(50.0)
        assert math.isfinite(rank["metrics"]["eval_loss"])


@pytest.mark.distributed
def test_every_checkpoint_holds_the_rng_state_of_every_rank(tiny_backbone_path, tmp_path):
    """Rank 1 wrote rng_state_1.pth while the main process was swapping in the checkpoint folder it had just
    written, and the file went with the replaced folder (missing from 4 of 6 checkpoints in one run), so a resume
    could not restore rank 1's random state."""
    ranks = _skip_worker(tiny_backbone_path("qwen3_vl"), tmp_path, "0", "checkpoints")
    files = ranks[0]["rng_files"]
    assert sorted(files) == [f"checkpoint-{step}" for step in (1, 2, 3, 4)]
    assert all(names == ["rng_state_0.pth", "rng_state_1.pth"] for names in files.values()), files


@pytest.mark.distributed
@pytest.mark.parametrize("micro", ["0", "1"])
def test_a_skipped_last_batch_of_an_accumulation_window_keeps_the_ranks_equal(tiny_backbone_path, tmp_path, micro):
    """With gradient accumulation, DDP averages the window's gradients in the backward of its last batch. When rank
    1 lost that batch (every example unreadable), the step was skipped on both ranks with no backward, and each rank
    stepped with its own first-batch gradients: the ranks' queries drifted apart (plain step; GradCache averages
    every backward itself)."""
    ranks = _skip_worker(tiny_backbone_path("qwen3_vl"), tmp_path, micro, "accumulation")
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["queries"] != ranks[0]["initial"]
    torch.testing.assert_close(torch.tensor(ranks[1]["queries"]), torch.tensor(ranks[0]["queries"]), rtol=0,
                               atol=1e-7)
