"""Trainer glue. The plain ``transformers.Trainer`` trains an SLQModel as is (see the README); SLQTrainer adds
conveniences: no need for ``remove_unused_columns=False``, a summary of skipped examples at the end of training,
and retrieval metrics (R@1 in both directions over the whole eval set) on evaluation.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .collator import SKIPPED_KEY, SLQDataCollator

logger = logging.getLogger(__name__)

# Outputs of SLQModel.forward that evaluation should not collect: (B, N_q, H) per example is large and unused.
EVAL_IGNORE_KEYS = ["query_states"]
# Checkpoints are written here first and renamed to checkpoint-N when complete. The name never matches the
# Trainer's ^checkpoint-(\d+)$ pattern, so resume_from_checkpoint=True never picks a half-written one.
STAGING_DIR = ".checkpoint-staging"


def retrieval_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for pair datasets: R@1 query -> positive and positive -> query over the whole eval set.

    Expects the predictions SLQTrainer collects: ``pooler_output`` (N, D) and ``positive_pooler_output`` (N, D) as
    the two 2-D arrays (in that order) of ``eval_pred.predictions``. Duplicate texts/images count as misses.
    """
    predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    if not isinstance(predictions, (tuple, list)):
        predictions = (predictions,)
    matrices = [np.asarray(p, dtype=np.float32) for p in predictions if np.ndim(p) == 2]
    if len(matrices) < 2:
        return {}
    query, positive = matrices[0], matrices[1]
    scores = query @ positive.T  # (N, N)
    target = np.arange(scores.shape[0])
    return {
        "r1_query_to_positive": float((scores.argmax(axis=1) == target).mean()),
        "r1_positive_to_query": float((scores.argmax(axis=0) == target).mean()),
    }


class SLQTrainer(Trainer):
    """``transformers.Trainer`` for SLQ models.

    Differences from the plain Trainer (which also works, given ``remove_unused_columns=False``):

    - example columns are always kept (the SLQ collator reads ``image``/``text``/``query``/... itself);
    - with an :class:`SLQDataCollator`, examples skipped because they could not be loaded (``strict=False``) are
      counted across dataloader workers and reported in one warning at the end of ``train()``
      (:attr:`skipped_examples` holds the descriptions);
    - ``compute_metrics`` defaults to :func:`retrieval_metrics`, and ``query_states`` are not collected;
    - checkpoints are atomic: ``checkpoint-N`` is written in a staging folder and renamed once complete (queries,
      optimizer, scheduler, RNG and trainer state), so a run killed at any moment leaves only complete checkpoints
      and ``resume_from_checkpoint=True`` (``slq-hf train --resume-from-checkpoint latest``) continues exactly.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", retrieval_metrics)
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, SLQDataCollator):
            self.data_collator.report_skips_in_batch = True
            if self.data_collator.max_length is None and hasattr(self.model, "max_prompt_length"):
                # Same truncation rule as SLQModel.encode: texts are cut so prompt + queries fit the backbone.
                self.data_collator.max_length = self.model.max_prompt_length()
        self.skipped_examples: dict[str, list[str]] = {"train": [], "eval": []}

    # The SLQ collator needs the raw example columns; the Trainer's column filtering would drop all of them.
    def _remove_unused_columns(self, dataset, description: str | None = None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        skipped = inputs.pop(SKIPPED_KEY, None)
        if skipped:
            self.skipped_examples["train" if self.model.training else "eval"].extend(skipped)
        return super()._prepare_inputs(inputs)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        if ignore_keys is None:
            ignore_keys = EVAL_IGNORE_KEYS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, the Trainer's own save code writes into the staging folder.
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written to ``<run>/.checkpoint-staging/checkpoint-N`` and renamed to
        ``<run>/checkpoint-N`` only when every file (and every rank's RNG state) is on disk."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a run killed while saving
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its files (rng_state_<rank>.pth)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # the same step saved again (e.g. a second train() call)
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self._repoint_best_checkpoint(run_dir, staging_root):
                state_file = os.path.join(final, "trainer_state.json")
                self.state.save_to_json(state_file + ".tmp")
                os.replace(state_file + ".tmp", state_file)
            # The Trainer rotated inside the staging folder (a no-op there); rotate among the real checkpoints.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _repoint_best_checkpoint(self, run_dir: str, staging_root: str) -> bool:
        """The Trainer looked for the best checkpoint inside the staging folder; point at the real folder instead.
        Returns True when ``state.best_model_checkpoint`` changed."""
        before = self.state.best_model_checkpoint
        best_step = self.state.best_global_step
        if best_step and os.path.isdir(best := os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")):
            self.state.best_model_checkpoint = best
        elif before and before.startswith(staging_root):
            self.state.best_model_checkpoint = None
        return self.state.best_model_checkpoint != before

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self._report_skipped("train")
        return result

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        self._report_skipped("eval")
        return metrics

    def _report_skipped(self, phase: str) -> None:
        skipped = self.skipped_examples[phase]
        if not skipped:
            return
        rank = f" on rank {self.args.process_index}" if self.args.world_size > 1 else ""
        shown = "\n  ".join(skipped[:10]) + ("\n  ..." if len(skipped) > 10 else "")
        logger.warning("%d %s example(s) could not be loaded and were skipped%s:\n  %s", len(skipped), phase, rank,
                       shown)
        self.skipped_examples[phase] = []


def trainable_parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters the optimizer will update (queries + temperature [+ head] for an SLQModel)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
