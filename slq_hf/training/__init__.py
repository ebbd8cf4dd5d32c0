"""Training SLQ queries: the pair collator, dataset readers, the contrastive loss and Trainer glue.

The Trainer parts (``SLQTrainer``, ``retrieval_metrics``) are imported on first use: they need the ``training``
extra (accelerate), while the collator, the readers and the loss need only the core dependencies.
"""

from typing import Any

from ..modeling.losses import ContrastiveOutput, gather_with_grad, symmetric_infonce
from .collator import SKIPPED_KEY, SOURCE_KEY, SkippedExample, SLQDataCollator, example_roles, load_item
from .data import HFPairDataset, PairDataset, load_training_data, read_jsonl

__all__ = [
    "SKIPPED_KEY",
    "SOURCE_KEY",
    "ContrastiveOutput",
    "HFPairDataset",
    "PairDataset",
    "SLQDataCollator",
    "SLQTrainer",
    "SkippedExample",
    "example_roles",
    "gather_with_grad",
    "load_item",
    "load_training_data",
    "read_jsonl",
    "retrieval_metrics",
    "symmetric_infonce",
]


def __getattr__(name: str) -> Any:
    if name in ("SLQTrainer", "retrieval_metrics"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
