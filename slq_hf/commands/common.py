"""Options shared by the commands that load a saved SLQ model (`eval`, `karr-build`, `index`, `search`, ...)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_options(parser: argparse.ArgumentParser, what: str = "saved SLQ folder (or Hub id)",
                      encodes: bool = True) -> None:
    """``--model DIR`` (required), ``--backbone ID_OR_PATH``, ``--device`` and, for commands that encode,
    ``--max-batch-tokens``."""
    parser.add_argument("--model", required=True, metavar="DIR", help=what)
    parser.add_argument("--backbone", metavar="ID_OR_PATH",
                        help="load the backbone from here instead of the one pinned in DIR/config.json (e.g. when "
                             "the folder was trained on a local copy that this machine keeps elsewhere)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if not encodes:  # a command that only generates has no encode batches to budget
        return
    parser.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                        help="at most N padded prompt tokens per forward besides the batch size: a large photo among "
                             "short texts then gets a batch of its own (same embeddings, less time and memory)")


def load_model(args: argparse.Namespace) -> Any:
    """The SLQModel of ``--model`` (backbone from ``--backbone`` if given) on ``--device``, batching its encodes by
    ``--max-batch-tokens`` when given."""
    max_batch_tokens = getattr(args, "max_batch_tokens", None)
    import torch

    from ..modeling import SLQModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = SLQModel.from_pretrained(args.model, backbone_name_or_path=args.backbone).to(device)
    except (OSError, ValueError) as err:
        hint = "" if args.backbone else " If its backbone lives elsewhere on this machine, pass --backbone PATH."
        raise OSError(f"cannot load the SLQ model from {args.model!r}: {err}{hint}") from err
    if max_batch_tokens is not None:
        if max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens {max_batch_tokens}: expected a positive number of tokens")
        model.max_batch_tokens = max_batch_tokens
    return model
