"""The one way every `slq-hf` command reports: ``slq-hf COMMAND: error: ...`` / ``warning: ...`` lines on stderr.

A command's ``run(args)`` is ``return report("NAME", lambda: library_call(...), done)``: the library reports user
mistakes as exceptions (ValueError, including DataFormatError/SLQInputError; OSError such as a missing file or a
model that cannot be loaded; ImportError for a missing extra) and doubtful inputs as ``UserWarning``. Here each
becomes one line instead of a traceback; exit status 2 for bad input. A bug (any other exception) still shows its
traceback, as it should.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
BAD_INPUT, FAILED = 2, 1  # exit statuses: the input was refused / the command ran but produced nothing usable


def _line(text: str) -> None:
    # tqdm.write moves open progress bars (a training run's) out of the way, so the line starts a line of its own.
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def error(command: str, message: Any, status: int = BAD_INPUT) -> int:
    """Print one error line for ``command`` (``""``: the top level); returns ``status`` so ``return error(...)`` ends
    a ``run``."""
    # One line even for libraries' multi-line messages (transformers' OSErrors), so the error is easy to spot.
    _line(f"slq-hf{' ' * bool(command)}{command}: error: {' '.join(str(message).split())}")
    return status


def report(command: str, call: Callable[[], Any], done: Callable[[Any], int | None] | None = None) -> int:
    """Run ``call()``, then ``done(result)`` (printing the outcome; its return value, default 0, is the status).

    UserWarnings raised meanwhile are printed as they happen (a long training run should not hide them until the
    end); ``USER_ERRORS`` in either end the command with one error line and status 2.
    """
    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, UserWarning):
                _line(f"slq-hf {command}: warning: {message}")
            else:
                original(message, category, *args, **kwargs)

        warnings.simplefilter("default", UserWarning)  # each distinct warning once, not once per batch
        warnings.showwarning = show
        try:
            result = call()
            # done writes outputs too (results JSON, figures): a path that cannot be written is a user error as well.
            status = done(result) if done is not None else 0
        except USER_ERRORS as err:
            return error(command, err)
    return int(status or 0)
