"""Options shared by the commands that load a saved SLQ model (`eval`, `karr-build`, `index`, `search`, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path
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


def check_model_source(value: str | None, flag: str) -> None:
    """Refuse a model option's ``value`` that can name no model: a path that does not exist and is no Hub id either
    (``/data/slq``, ``./slq``, ``a/b/c``, which transformers reports as a malformed repo id), a file, or a folder
    without config.json (which it reports as an unreadable config or an unrecognised model)."""
    if value is None:
        return
    path = Path(value)
    if path.is_file():
        raise ValueError(f"{flag} {value}: is a file; give a model folder (with config.json) or a Hub id (org/name).")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{flag} {value}: no config.json, so not a model folder (save_pretrained writes one). Is "
                         "this the right folder?")
    if path.exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"{flag} {value}: no such folder, and not a Hub id (org/name) either. Check the "
                         "path.") from None


def load_model(args: argparse.Namespace) -> Any:
    """The SLQModel of ``--model`` (backbone from ``--backbone`` if given) on ``--device``, batching its encodes by
    ``--max-batch-tokens`` when given."""
    max_batch_tokens = getattr(args, "max_batch_tokens", None)
    from ..modeling import SLQModel

    device = resolve_device(args.device)
    try:
        check_model_source(args.model, "--model")
        check_model_source(args.backbone, "--backbone")
        model = SLQModel.from_pretrained(args.model, backbone_name_or_path=args.backbone).to(device)
    except (OSError, ValueError) as err:
        # Only when the backbone is what failed: a folder that is not SLQ's is not fixed by --backbone.
        hint = ("" if args.backbone or "backbone" not in str(err)
                else " If its backbone lives elsewhere on this machine, pass --backbone PATH.")
        raise OSError(f"cannot load the SLQ model from {args.model!r}: {err}{hint}") from err
    if max_batch_tokens is not None:
        if max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens {max_batch_tokens}: expected a positive number of tokens")
        model.max_batch_tokens = max_batch_tokens
    return model


def resolve_device(name: str | None) -> str:
    """``--device``, checked before anything is loaded: a device torch knows and this machine has (default: cuda if
    available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, ValueError) as err:  # unknown type, no driver, CUDA not compiled in
        raise ValueError(f"--device {name}: {str(err).splitlines()[0]} Pass a device this machine has (cpu, cuda, "
                         "cuda:0, mps...).") from None
    return name


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file ``path`` that can never be written (a folder, or a path under a file) before any work is
    done; other write errors (permissions, a full disk) still end in one error line when the file is written."""
    if path is None:
        return
    target = Path(path)
    under_file = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give the path of a file to write.")
    if under_file is not None:
        raise ValueError(f"{flag} {path}: {under_file} is a file, so nothing can be written under it.")
