"""Worker for tests/test_distributed.py, started with `torchrun --nproc_per_node 2` on the CPU (gloo).

Trains ONE step of the plain transformers Trainer on PAIRS (6 pairs = the whole global batch of 2 x 3) and writes,
per rank, the loss SLQModel.forward returned and the gradients the optimizer was about to apply (after DDP's
all-reduce): ``<out>/rank<r>.json``.

With ``--micro-batch-size N`` the step is SLQTrainer's GradCache step instead (each rank's 3 pairs embedded N at a
time); ``batch_rows`` then lists the micro-batch sizes and ``loss`` the step's returned loss.

Usage: python -m torch.distributed.run --nproc_per_node 2 ddp_trainer_worker.py BACKBONE_DIR OUT_DIR
           [--micro-batch-size N]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

PER_DEVICE_BATCH = 3
NUM_QUERIES = 4


def _scene(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def make_pairs() -> list[dict]:
    """6 pairs mixing the two example formats; two of them carry a hard negative (so ranks gather M = 0..2)."""
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
               "purple": (128, 0, 128), "cyan": (0, 255, 255)}
    names = list(colours)
    pairs: list[dict] = []
    for i, name in enumerate(names):
        if i % 3 == 0:
            other = names[(i + 1) % len(names)]
            pairs.append({"query": f"a {name} square", "positive": _scene(colours[name]),
                          "negative": _scene(colours[other], size=96)})
        else:
            pairs.append({"image": _scene(colours[name]), "text": f"a {name} square on grey"})
    return pairs


def main(backbone: str, out_dir: str, micro_batch_size: int | None = None) -> None:
    torch.set_num_threads(1)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slq_hf import SLQModel
    from slq_hf.training import SLQDataCollator, SLQTrainer
    from slq_hf.training.gradcache import MICRO_BATCHES_KEY

    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    record: dict = {"loss": [], "batch_rows": []}

    def on_forward(module, args, kwargs, output):
        record["loss"].append(output.loss.item())
        record["batch_rows"].append(int(kwargs["input_ids"].shape[0]))

    if micro_batch_size is None:
        model.register_forward_hook(on_forward, with_kwargs=True)

    class RecordingTrainer(SLQTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            record["batch_rows"] = [int(b["input_ids"].shape[0]) for b in inputs[MICRO_BATCHES_KEY]]
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["loss"].append(loss.item())
            return loss

    class GradRecorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # `model` is the unwrapped SLQModel; its grads were all-reduced (averaged) by DDP in backward.
            record["queries_grad"] = model.queries.grad.tolist()
            record["logit_scale_grad"] = model.logit_scale.grad.item()

    args = TrainingArguments(
        out_dir, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=PER_DEVICE_BATCH, max_steps=1,
        learning_rate=1e-3, max_grad_norm=0.0, report_to="none", save_strategy="no", remove_unused_columns=False,
        seed=0, disable_tqdm=True,
    )
    if micro_batch_size is None:
        trainer = Trainer(model=model, args=args, train_dataset=make_pairs(),
                          data_collator=SLQDataCollator(model.processor), callbacks=[GradRecorder()])
    else:
        trainer = RecordingTrainer(model=model, args=args, train_dataset=make_pairs(),
                                   data_collator=SLQDataCollator(model.processor), callbacks=[GradRecorder()],
                                   micro_batch_size=micro_batch_size)
    record["world_size"] = args.world_size
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    trainer.accelerator.end_training()  # a gloo group left open can abort the process at exit


if __name__ == "__main__":
    micro = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--micro-batch-size" else None
    main(sys.argv[1], sys.argv[2], micro)
