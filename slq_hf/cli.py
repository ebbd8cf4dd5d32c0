"""`slq-hf` command line. Each subcommand lives in ``slq_hf/commands/<name>.py`` and is listed in COMMANDS.

A subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` (its one-line ``help=`` is the
summary ``slq-hf --help`` lists) and sets ``func`` on it with ``parser.set_defaults(func=run)``;
``run(args) -> int | None`` does the work. Heavy imports (torch, transformers) belong inside ``run``.

The parser is lazy: ``slq-hf --help`` reads each command's summary from its module's source without importing it,
and ``slq-hf COMMAND ...`` imports only that command's module. So the listing answers in a fraction of a second, and
a command's ``--help`` costs only its own module's imports.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import runpy
import sys
from collections.abc import Iterable, Sequence
from functools import cache, partial
from pathlib import Path

# name -> module. Order = order in `slq-hf --help`.
COMMANDS: dict[str, str] = {
    "train": "slq_hf.commands.train",
    "eval": "slq_hf.commands.eval",
    "export": "slq_hf.commands.export",
    "push": "slq_hf.commands.push",
    "convert-reference": "slq_hf.commands.convert_reference",
    "karr-build": "slq_hf.commands.karr_build",
    "index": "slq_hf.commands.index",
    "search": "slq_hf.commands.search",
}

# Third-party notices that every `slq-hf` run would print and that ask nothing of its user: logger name -> the level
# the command line sets (the library itself leaves logging configuration to the application).
QUIET_LOGGERS: dict[str, int] = {
    # bitsandbytes (imported by peft, which transformers' Trainer imports when installed) tries at import to fetch an
    # optional CPU 4-bit kernel and warns when the `kernels` package is absent; it then uses its built-in kernel.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}

INTERRUPTED = 130  # exit status after Ctrl-C: 128 + SIGINT, as a shell reports a command that SIGINT ended

DESCRIPTION = ("SLQ (Shared Latent Queries): embedding models on frozen Hugging Face vision-language backbones. "
               "Run `slq-hf COMMAND --help` for the options of a command, `slq-hf --version` for the release.")


@cache
def command_summary(name: str) -> str:
    """The ``help=`` text that COMMANDS[name]'s ``add_parser`` passes to ``subparsers.add_parser(name, ...)``.

    Read from the module's source with ``ast`` (the module is located, not executed), so listing the commands
    imports none of them. A module whose call has no literal ``help=`` string gets its docstring's first line.
    """
    module = COMMANDS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"slq-hf command {name!r}: module {module} (listed in slq_hf.cli.COMMANDS) "
                                  "was not found")
    with open(spec.origin, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=spec.origin)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_parser"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
            for keyword in node.keywords:
                if keyword.arg == "help" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    docstring = ast.get_docstring(tree) or ""
    return docstring.split("\n", 1)[0].split(": ", 1)[-1]


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``slq-hf`` parser. Commands in ``commands`` (default: all) get their full parser, which imports their
    module; the others are listed with their summary only (nothing imported)."""
    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="slq-hf", description=DESCRIPTION)
    # Named in DESCRIPTION rather than in the usage line, which stays `slq-hf [-h] COMMAND ...`.
    parser.add_argument("--version", action="version", version=f"slq-hf {_version()}", help=argparse.SUPPRESS)
    # A command's description and epilog are laid out by hand (format tables, examples): printed as written.
    command_parser = partial(argparse.ArgumentParser, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=command_parser)
    for name, module in COMMANDS.items():
        if name in full:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=command_summary(name), add_help=False)
    return parser


def _version() -> str:
    """slq_hf's release, read from ``slq_hf/modeling/version.py`` without importing ``slq_hf.modeling`` (torch)."""
    return str(runpy.run_path(str(Path(__file__).parent / "modeling" / "version.py"))["SLQ_HF_VERSION"])


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first argument that is not an option (the top level takes only -h)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Run ``slq-hf`` on ``argv``; returns the exit status.

    As the program (``argv`` None: the ``slq-hf`` console script, ``python -m slq_hf.cli``), Ctrl-C ends the command
    with one line and status 130, a shell's status for a command ended by SIGINT, instead of a traceback. Called
    from Python with ``argv``, the KeyboardInterrupt reaches the caller, as Python code expects.
    """
    if argv is None:
        try:
            return main(sys.argv[1:])
        except KeyboardInterrupt:
            from .commands.reporting import error

            # `train` has already put back a run it was overwriting, on the way out.
            return error(_command_in(sys.argv[1:]) or "", "interrupted (Ctrl-C).", INTERRUPTED)
    argv = list(argv)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    command = _command_in(argv)
    parser = build_parser([] if command is None else [command])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
