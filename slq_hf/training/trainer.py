"""Trainer glue. The plain ``transformers.Trainer`` trains an SLQModel as is (see the README); SLQTrainer adds
conveniences: no need for ``remove_unused_columns=False``, a summary of skipped examples at the end of training,
and retrieval metrics (R@1 in both directions over the whole eval set) on evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from .collator import SKIPPED_KEY, SLQDataCollator

logger = logging.getLogger(__name__)

# Outputs of SLQModel.forward that evaluation should not collect: (B, N_q, H) per example is large and unused.
EVAL_IGNORE_KEYS = ["query_states"]


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
    - ``compute_metrics`` defaults to :func:`retrieval_metrics`, and ``query_states`` are not collected.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", retrieval_metrics)
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, SLQDataCollator):
            self.data_collator.report_skips_in_batch = True
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
