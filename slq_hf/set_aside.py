"""Replace what a folder holds without losing it first: the old entries wait in a hidden backup folder (renames,
nothing copied) until the new ones are complete, and come back if making them fails.

Used by ``slq-hf train --overwrite-output-dir`` (the earlier run) and ``slq-hf index build --overwrite`` (the
earlier build).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def remove(paths: list[Path]) -> None:
    """Delete files and folders (a symlink is unlinked, never followed)."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def set_aside(entries: list[Path], backup: Path) -> bool:
    """Move ``entries`` (existing paths in ``backup``'s parent) into ``backup``; True when ``backup`` now holds
    something to restore.

    When ``backup`` is already there, an earlier replacement was killed: it still holds the last complete contents,
    and ``entries`` are that killed attempt's partial output, which goes."""
    if backup.is_dir():
        remove(entries)
        return True
    if not entries:
        return False
    backup.mkdir()
    for path in entries:
        os.replace(path, backup / path.name)
    return True


def put_back(entries: list[Path], backup: Path) -> None:
    """Undo :func:`set_aside` after the replacement failed: ``entries`` (its partial output) go, the backup's
    contents return to their folder."""
    if not backup.is_dir():
        return
    remove(entries)
    for path in backup.iterdir():
        os.replace(path, backup.parent / path.name)
    backup.rmdir()
