"""GradCache (a contrastive batch embedded micro-batch by micro-batch) against one big batch: the gradients of the
queries and the temperature, with hard negatives, several query sets and both training paths; SLQTrainer resume
mid-epoch; and two torchrun processes against one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from slq_hf import SLQModel
from slq_hf.training import SLQDataCollator, SLQTrainer
from slq_hf.training.gradcache import MICRO_BATCHES_KEY, gradcache_backward

from helpers import stop_at_step

NUM_QUERIES = 4
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (128, 0, 128), (0, 255, 255), (255, 255, 255),
           (0, 0, 0), (255, 128, 0), (0, 128, 128)]
WORKER = Path(__file__).with_name("ddp_trainer_worker.py")


def _scene(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def _examples(count: int, negatives: bool) -> list[dict]:
    """Image/text pairs and text->image pairs; with ``negatives``, every third example has a hard negative (so some
    micro-batches have none)."""
    out = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        if i % 2:
            out.append({"image": _scene(colour, 64 + 32 * (i % 3 == 0)), "text": f"colour number {i} on grey"})
        else:
            example = {"query": f"square number {i}", "positive": _scene(colour)}
            if negatives and i % 3 == 0:
                example["negative"] = _scene(COLOURS[(i + 1) % len(COLOURS)], 96)
            out.append(example)
    return out


def _grads(model: SLQModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture
def backbone(tiny_backbone_path) -> str:
    return tiny_backbone_path("qwen3_vl")


@pytest.mark.parametrize("training_path", ["prefix_cache", "full"])
@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize("micro", [1, 3, 4])
def test_gradcache_gradients_equal_one_big_batch(backbone, training_path, negatives, micro):
    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES, training_path=training_path)
    model.train()
    examples = _examples(8, negatives)
    big = model(**SLQDataCollator(model.processor)(examples))
    big.loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    batch = SLQDataCollator(model.processor, micro_batch_size=micro)(examples)
    parts = batch[MICRO_BATCHES_KEY]
    assert [p["input_ids"].shape[0] for p in parts] == [min(micro, 8 - s) for s in range(0, 8, micro)]
    loss, accuracy = gradcache_backward(model, parts)
    assert loss.item() == pytest.approx(big.loss.item(), rel=1e-6)
    assert accuracy.item() == pytest.approx(big.accuracy.item())
    got = _grads(model)
    assert len(got) == 2 and "logit_scale" in got  # the queries and the temperature, nothing of the backbone
    for name in expected:
        assert _relative(got[name], expected[name]) <= 1e-5, name


def test_gradcache_with_several_query_sets_equals_the_joint_forward(backbone):
    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    model.add_query_set("document", num_queries=3)
    model.joint_query_sets = ["default", "document"]
    model.train()
    examples = _examples(6, negatives=True)
    model(**SLQDataCollator(model.processor)(examples)).loss.backward()
    expected = _grads(model)
    assert len(expected) == 3  # two query sets and the temperature
    model.zero_grad(set_to_none=True)
    gradcache_backward(model, SLQDataCollator(model.processor, micro_batch_size=4)(examples)[MICRO_BATCHES_KEY])
    got = _grads(model)
    for name in expected:
        assert _relative(got[name], expected[name]) <= 1e-5, name


def test_random_state_is_replayed_and_the_frozen_backbone_draws_nothing(backbone):
    """The re-run of a micro-batch replays the random state of its no-grad pass, so a trainable module with dropout
    would compute the same function twice (negative control: without the replay the draws differ). With a frozen
    backbone there is nothing to draw: SLQModel.train() keeps the backbone in eval mode."""
    from slq_hf.training.gradcache import replay_random_state

    ones = torch.ones(1000)
    with replay_random_state(None) as state:
        first = torch.nn.functional.dropout(ones, 0.5)
    unreplayed = torch.nn.functional.dropout(ones, 0.5)
    with replay_random_state(state):
        replayed = torch.nn.functional.dropout(ones, 0.5)
    assert torch.equal(first, replayed) and not torch.equal(first, unreplayed)

    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    model.train()
    assert model.training and not any(m.training for m in model.backbone.modules())


def _pairs(count: int) -> list[dict]:
    return [{"image": _scene(COLOURS[i % len(COLOURS)], 64), "text": f"a square of colour {i}"}
            for i in range(count)]


def test_resume_mid_epoch_with_gradcache_equals_uninterrupted(backbone, tmp_path):
    def run(out: Path, resume: str | None = None, stop_at: int | None = None) -> SLQModel:
        model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
        args = TrainingArguments(str(out), learning_rate=1e-2, per_device_train_batch_size=4, num_train_epochs=2,
                                 remove_unused_columns=False, use_cpu=True, report_to="none", disable_tqdm=True,
                                 seed=0, save_strategy="steps", save_steps=1)
        trainer = SLQTrainer(model=model, args=args, train_dataset=_pairs(10),
                             data_collator=SLQDataCollator(model.processor), micro_batch_size=3,
                             callbacks=[stop_at_step(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "a")  # 10 pairs / 4 = 3 steps an epoch (4, 4, 2), 6 steps
    interrupted = run(tmp_path / "b", stop_at=4)  # stops inside epoch 2
    assert not torch.equal(interrupted.queries, uninterrupted.queries)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"))
    assert torch.allclose(resumed.queries, uninterrupted.queries, rtol=0, atol=1e-6)
    assert resumed.logit_scale.item() == pytest.approx(uninterrupted.logit_scale.item(), abs=1e-6)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradcache_step_equals_a_plain_trainer_step(backbone, tmp_path, accumulation):
    """One optimizer step of SLQTrainer with micro-batches moves the queries exactly as the plain step on the whole
    batch; with gradient accumulation (two contrastive batches of 6 per optimizer step), as the plain accumulated
    step (each batch's loss scaled by 1/2 in both; SGD without clipping, so a wrong scale shows, where Adam or the
    gradient clip would normalise it)."""
    def step(micro: int | None) -> torch.Tensor:
        model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
        args = TrainingArguments(str(tmp_path / str(micro)), learning_rate=1e-2, per_device_train_batch_size=6,
                                 gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", max_grad_norm=0,
                                 remove_unused_columns=False, use_cpu=True, report_to="none", disable_tqdm=True,
                                 seed=0, save_strategy="no")
        trainer = SLQTrainer(model=model, args=args, train_dataset=_pairs(6 * accumulation),
                             data_collator=SLQDataCollator(model.processor), micro_batch_size=micro)
        trainer.train()
        assert trainer.state.global_step == 1
        return model.queries.detach().clone()

    plain, cached = step(None), step(2)
    start = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES).queries.detach()
    assert not torch.equal(plain, start)
    assert _relative(cached - start, plain - start) <= 1e-4


def test_micro_batch_size_is_validated(backbone, tmp_path):
    """Checked when the collator is built and when SLQTrainer sets it (0 used to fail in the dataloader with
    "range() arg 3 must not be zero", -1 in gradcache_backward with a bare StopIteration)."""
    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=1, remove_unused_columns=False,
                             use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_size"):
            SLQDataCollator(model.processor, micro_batch_size=bad)
        with pytest.raises(ValueError, match="micro_batch_size"):
            SLQTrainer(model=model, args=args, train_dataset=_pairs(4), data_collator=SLQDataCollator(model.processor),
                       micro_batch_size=bad)


def test_gradcache_evaluation_reports_the_recalls_and_loss_of_the_plain_path(backbone, tmp_path):
    """Evaluating with micro-batches gives the recalls (and the loss) of the plain evaluation. Text -> same text
    pairs embed identically, so rows 0-5 are hits; rows 6-9 have their positives shifted by one (each query's own
    text is another row's positive), so they are misses both ways: R@1 = 60 exactly, whatever the random queries.
    Before the fix, the micro-batched eval step returned no labels and the Trainer dropped every recall."""
    texts = [f"a square of colour {name}" for name in
             ("red", "green", "blue", "yellow", "purple", "cyan", "white", "black", "orange", "teal")]
    pairs = [{"query": t, "positive": t} for t in texts[:6]]
    pairs += [{"query": texts[i], "positive": texts[6 + (i - 5) % 4]} for i in range(6, 10)]

    def evaluate(micro: int | None) -> dict[str, float]:
        model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
        args = TrainingArguments(str(tmp_path / str(micro)), per_device_train_batch_size=4,
                                 per_device_eval_batch_size=5, remove_unused_columns=False, use_cpu=True,
                                 report_to="none", disable_tqdm=True)
        trainer = SLQTrainer(model=model, args=args, eval_dataset=pairs,
                             data_collator=SLQDataCollator(model.processor), micro_batch_size=micro)
        return trainer.evaluate()

    plain, cached = evaluate(None), evaluate(2)
    for metrics in (plain, cached):
        assert metrics["eval_query2positive_R@1"] == pytest.approx(60.0)
        assert metrics["eval_positive2query_R@1"] == pytest.approx(60.0)
        assert metrics["eval_mean_R@1"] == pytest.approx(60.0)
    assert cached["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_gradcache_step_puts_a_schedule_free_optimizer_back_in_train_mode(backbone, tmp_path):
    """Schedule-free optimizers are switched to eval mode by evaluate() and must be switched back before a step, as
    the Trainer's own training_step does (schedulefree refuses to step in eval mode). The stand-in below has the
    same contract."""
    class ModalSGD(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            self.train_mode = False  # schedulefree starts in eval mode too

        def train(self):
            self.train_mode = True

        def eval(self):
            self.train_mode = False

        def step(self, closure=None):
            if not self.train_mode:
                raise RuntimeError("step() in eval mode")
            return super().step(closure)

    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    optimizer = ModalSGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                             eval_strategy="steps", eval_steps=1, remove_unused_columns=False, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = SLQTrainer(model=model, args=args, train_dataset=_pairs(8), eval_dataset=_pairs(4),
                         data_collator=SLQDataCollator(model.processor), micro_batch_size=2,
                         optimizers=(optimizer, None))
    trainer.train()  # step 2 follows an evaluation, which put the optimizer in eval mode
    assert trainer.state.global_step == 2


@pytest.mark.distributed
def test_two_process_gradcache_equals_one_process_on_concatenated_batch(backbone, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               backbone, str(tmp_path), "--micro-batch-size", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["batch_rows"] for r in ranks] == [[2, 1], [2, 1]]  # 3 pairs a rank, in micro-batches of 2 and 1

    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_trainer_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model = SLQModel.from_backbone(backbone, num_queries=worker.NUM_QUERIES)
    out = model(**SLQDataCollator(model.processor)(worker.make_pairs()))
    out.loss.backward()
    for rank in ranks:
        assert abs(rank["loss"][0] - out.loss.item()) <= 1e-5
        assert _relative(torch.tensor(rank["queries_grad"]), model.queries.grad) <= 1e-5
        assert rank["logit_scale_grad"] == pytest.approx(model.logit_scale.grad.item(), rel=1e-5, abs=1e-7)
