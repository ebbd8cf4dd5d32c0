"""Worker for tests/test_distributed.py's skipped-batch test, started with `torchrun --nproc_per_node 2` (gloo).

Two SLQTrainer steps of 3 image/caption pairs a rank. On rank 1 the first batch is replaced by pairs whose images
are all unreadable files, so that rank's batch loses every example: both ranks must skip that step together (no
collective left waiting) and train the second. Writes ``<out>/rank<r>.json`` with the skipped steps, the global step
and the final queries.

MODE (after MICRO_BATCH, "0" for none): "skip" (the above, default); "accumulation": the same with 2 batches
accumulated per step, rank 1's SECOND batch unreadable (the last of step 1's window); "checkpoints": 4 steps, a
checkpoint after each (the record lists each checkpoint's RNG state files); "eval": no training, an evaluation of
EVAL_TEXTS, text pairs some of which are unreadable images (one of rank 1's first batch, all of rank 0's second, so
the ranks' batches differ in rows; the record holds the metrics).

Usage: python -m torch.distributed.run --nproc_per_node 2 ddp_skip_worker.py BACKBONE_DIR OUT_DIR [MICRO_BATCH [MODE]]
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
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (128, 0, 128), (0, 255, 255)]
# Eval pairs (query, positive), 2 a rank a batch: batches [0, 1] [4, 5] on rank 0, [2, 3] [6 + padding] on rank 1.
# None: an unreadable image. Same-text pairs embed identically (hits); rows 3 and 6 swap texts (misses both ways).
EVAL_TEXTS = [("a red square", "a red square"), ("a blue circle", "a blue circle"), None,
              ("a green star", "a yellow moon"), None, None, ("a yellow moon", "a green star")]


def main(backbone: str, out_dir: str, micro_batch_size: int | None, mode: str = "skip") -> None:
    torch.set_num_threads(1)
    from transformers import TrainingArguments

    from slq_hf import SLQModel
    from slq_hf.training import SLQDataCollator, SLQTrainer

    rank = int(os.environ["RANK"])
    folder = Path(out_dir, f"images{rank}")
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(2 * 2 * PER_DEVICE_BATCH):
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        image.paste(COLOURS[i % len(COLOURS)], (16, 16, 48, 48))
        image.save(folder / f"{i}.png")
        pairs.append({"image": str(folder / f"{i}.png"), "text": f"a square of colour {i}"})
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")

    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)

    class BrokenBatchOnRank1(SLQDataCollator):
        calls = 0

        def __call__(self, examples: list[dict]) -> dict:
            self.calls += 1
            if rank == 1 and self.calls == (2 if mode == "accumulation" else 1):
                examples = [{**example, "image": str(broken)} for example in examples]
            return super().__call__(examples)

    mode_args = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1} if mode == "checkpoints" else {}
    if mode == "accumulation":
        mode_args = {"gradient_accumulation_steps": 2}
    args = TrainingArguments(**{
        "output_dir": out_dir, "use_cpu": True, "ddp_backend": "gloo", "per_device_train_batch_size": PER_DEVICE_BATCH,
        "per_device_eval_batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "report_to": "none",
        "save_strategy": "no", "remove_unused_columns": False, "seed": 0, "disable_tqdm": True,
        "dataloader_num_workers": 0, **mode_args})
    broken_batch = mode in ("skip", "accumulation")
    collator = BrokenBatchOnRank1(model.processor) if broken_batch else SLQDataCollator(model.processor)
    if mode == "eval":
        evaluation = [{"query": pair[0], "positive": pair[1]} if pair else
                      {"query": {"image": str(broken)}, "positive": "unreadable"} for pair in EVAL_TEXTS]
        trainer = SLQTrainer(model=model, args=args, eval_dataset=evaluation, data_collator=collator,
                             micro_batch_size=micro_batch_size)
        record = {"metrics": trainer.evaluate()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        trainer.accelerator.end_training()
        return
    trainer = SLQTrainer(model=model, args=args, train_dataset=pairs, data_collator=collator,
                         micro_batch_size=micro_batch_size)
    initial = model.queries.detach().clone()
    trainer.train()
    record = {"skipped_steps": trainer.skipped_steps, "global_step": trainer.state.global_step,
              "queries": model.queries.detach().tolist(), "initial": initial.tolist(),
              "rng_files": {p.name: sorted(f.name for f in p.glob("rng_state*"))
                            for p in Path(out_dir).glob("checkpoint-*")}}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    trainer.accelerator.end_training()  # a gloo group left open can abort the process at exit


if __name__ == "__main__":
    micro = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "0" else None
    main(sys.argv[1], sys.argv[2], micro, *sys.argv[4:5])
