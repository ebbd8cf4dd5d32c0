"""How the publishing commands (`slq-hf export`, `slq-hf push`) report the library call they wrap."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any


def run_reported(command: str, call: Callable[[], Any],
                 errors: tuple[type[Exception], ...] = (ValueError,)) -> tuple[Any, int]:
    """Run ``call()``; returns (its result, exit status 0), or (None, 2) after printing an error.

    The library reports user mistakes as ``errors`` (``ValueError`` ...) and doubtful inputs as ``UserWarning``.
    On a terminal, both become one ``slq-hf COMMAND: error: ...`` / ``warning: ...`` line on stderr instead of a
    traceback. Warnings are printed only when the call succeeds: after an error they would only distract from it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except errors as err:
            print(f"slq-hf {command}: error: {err}", file=sys.stderr)
            return None, 2
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"slq-hf {command}: warning: {warning.message}", file=sys.stderr)
    return result, 0
