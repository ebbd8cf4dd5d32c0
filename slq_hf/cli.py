"""`slq-hf` command line. Each subcommand lives in ``slq_hf/commands/<name>.py`` and is listed in COMMANDS.

A subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func`` on it with
``parser.set_defaults(func=run)``; ``run(args) -> int | None`` does the work. Heavy imports (torch,
transformers) belong inside ``run`` so ``slq-hf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module. Order = order in `slq-hf --help`.
COMMANDS: dict[str, str] = {
    "train": "slq_hf.commands.train",
    "eval": "slq_hf.commands.eval",
    "export": "slq_hf.commands.export",
    "push": "slq_hf.commands.push",
    "convert-reference": "slq_hf.commands.convert_reference",
    "karr-build": "slq_hf.commands.karr_build",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slq-hf",
        description="SLQ (Shared Latent Queries): embedding models on frozen Hugging Face vision-language "
        "backbones. Run `slq-hf COMMAND --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
