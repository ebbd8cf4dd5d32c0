"""The one record type every image+text reader yields (:class:`Record`: a query :class:`Item`, its positives, an
optional hard negative, where it came from), and the helpers the file readers share."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image


class DataFormatError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file and, if known, the line."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclass(frozen=True)
class DatasetImage:
    """An image in row ``row`` of ``column`` of a ``datasets`` table, read only when needed. A cell holding only a
    relative path is resolved against ``root`` (``image_root``, as for a column of path strings)."""

    dataset: Any = field(repr=False, compare=False)
    column: str
    row: int
    root: Path | None = None

    def raw(self) -> dict[str, Any]:
        """The undecoded cell ``{"bytes", "path"}`` (what the training collator decodes)."""
        value = self.dataset[self.row][self.column] or {}
        path = value.get("path")
        if self.root is not None and not value.get("bytes") and isinstance(path, str) and path and "://" not in path:
            value = {**value, "path": str(self.root / Path(path).expanduser())}  # an absolute path stays as it is
        return value

    @cached_property
    def key(self) -> str:
        """Identifies the image: hash of its bytes, else its path with the file's size and mtime (a file replaced
        under the same name gets a new key; the embedding cache keys such a cell on the file's bytes, with
        :func:`file_digest`). Equal images share a key."""
        value = self.raw()
        if value.get("bytes"):
            return f"sha1:{hashlib.sha1(value['bytes']).hexdigest()}"
        try:
            stat = os.stat(value["path"])
        except (OSError, TypeError, ValueError):
            return f"path:{value.get('path')}"
        return f"path:{value['path']}:{stat.st_size}:{stat.st_mtime_ns}"

    def load(self) -> Image.Image:
        """The image, opened lazily (header only) with the checks every image input gets (allowed formats: an EPS
        never reaches Ghostscript); SLQInputError naming the row and column, and the file, when it cannot be."""
        from ..modeling.image_files import open_image

        value = self.raw()
        if not (value.get("bytes") or value.get("path")):
            raise ValueError(f"Row {self.row} of column {self.column!r} holds no image bytes or path.")
        path = value.get("path")
        label = f"row {self.row} of column {self.column!r}" + (f", file {path!r}" if path else "")
        return open_image(value["bytes"] if value.get("bytes") else value["path"], label)


ImageSource = str | os.PathLike | Image.Image | DatasetImage


@dataclass(frozen=True)
class Item:
    """An image, a text, or both (a composed query). ``text`` is always a text, even ``IMG_0042.JPG`` or the name of
    an existing file; ``name`` is how the data file names the image (its id or path as written)."""

    image: ImageSource | None = None
    text: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Record:
    """One example of a data file. ``source`` is ``"<file>:<line>"`` or ``"<dataset>: row <n>"``, for messages."""

    query: Item
    positives: tuple[Item, ...]
    negative: Item | None = None
    source: str = ""
    line: int | None = None
    split: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)  # the line's other fields (caption, object, id, ...)


# ---------------------------------------------------------------------------------------------- file helpers
def read_text(path: Path) -> str:
    """The file's text: UTF-8, with or without a byte-order mark (Windows editors write one)."""
    if not path.exists():
        raise DataFormatError(path, "data file not found.")
    if path.is_dir():
        raise DataFormatError(path, "is a directory; expected a data file (use --format hf for a datasets folder).")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = data.count(b"\n", 0, err.start) + 1, err.start - data.rfind(b"\n", 0, err.start)
        raise DataFormatError(path, f"not UTF-8 text (byte {data[err.start:err.start + 1]!r} at column {column}); "
                              "save the file as UTF-8 (is this really a JSON/JSONL file?).", line) from err


def text_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at "\\n" only (a "\\r" before it is dropped), never at the other characters
    ``str.splitlines`` breaks at (U+2028, U+0085, form feed...), which JSON strings may hold unescaped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def json_lines(path: Path, split: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line (each must be one JSON object); with ``split``, only the
    lines of that split when the file has a "split" field (a file without one is a single split)."""
    records = []
    for number, raw in enumerate(text_lines(read_text(path)), start=1):
        try:
            record = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError as err:
            raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}; each line must be one JSON "
                                  "object.", number) from err
        if record is not None and not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}.", number)
        records += [(number, record)] if record is not None else []
    if not records:
        raise DataFormatError(path, "the file holds no records.")
    untagged = [line for line, rec in records if "split" not in rec]
    if split in (None, "all") or len(untagged) == len(records):
        return records
    if untagged:
        raise DataFormatError(path, "this line has no \"split\" while other lines do; give every line a split.",
                              untagged[0])
    # As text: a file's "split": 1 is the split --split 1 names (the error below lists it as '1').
    kept = [(line, rec) for line, rec in records if str(rec["split"]) == str(split)]
    if not kept:
        found = sorted({str(rec["split"]) for _, rec in records})
        raise DataFormatError(path, f"no line has split {split!r}; splits in the file: {found}.")
    return kept


def resolve_image(raw: Any, base: Path, path: Path, line: int | None, check: bool, what: str = "image") -> Path:
    """An image path of a data file, relative to ``base`` (the file's folder) unless absolute."""
    if not isinstance(raw, str) or not raw.strip():
        raise DataFormatError(path, f"{what!r} must be a non-empty path string (relative to the file or absolute), "
                              f"got {raw!r}.", line)
    resolved = Path(raw).expanduser()
    resolved = resolved if resolved.is_absolute() else base / resolved
    if check:
        check_image_file(resolved, path, line, f"{what} file {raw!r}")
    return resolved


def check_image_file(resolved: Path, path: Any, line: int | None, what: str) -> None:
    """Refuse an image path that is not a file, saying which of the usual reasons it is."""
    problem = image_file_problem(resolved)
    if problem is not None:
        raise DataFormatError(path, f"{what} {problem}.", line)


def image_file_problem(resolved: Path) -> str | None:
    """None for an image path that is a file, else why not: missing, a folder, a broken link, not a regular file."""
    if resolved.is_file():
        return None
    if resolved.is_dir():
        return f"is a folder, not an image file (at {resolved})"
    if resolved.is_symlink():
        return f"is a broken symbolic link (at {resolved}, pointing to {os.readlink(resolved)})"
    if resolved.exists():
        return f"is not a regular file (at {resolved})"
    return f"not found (looked at {resolved})"


def captions(value: Any, key: str, path: Path, line: int | None) -> list[str]:
    """One caption or a non-empty list of them, as a list."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise DataFormatError(path, f"{key!r} must be a non-empty caption or a list of them, got {value!r}.", line)
    return values


# (resolved path, device, inode, size, mtime, ctime) -> digest of the file's bytes, so each file is read once per
# process; ctime moves on every write, rename onto the path and utime, which `cp -p`, `touch -r` and rsync -t use to
# keep the old mtime.
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read once per process per version of the file (about 0.3 ms for a 150 KB
    JPEG, a twentieth of decoding it). What caches key image files on: path, size and mtime miss a picture replaced
    by another of the same size with the mtime kept. FileNotFoundError naming the file when it cannot be read."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise FileNotFoundError(f"Image file not found: {path}") from err
    memo = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    digest = _FILE_DIGESTS.get(memo)
    if digest is None:
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
        except OSError as err:
            raise FileNotFoundError(f"Image file {path} cannot be read: {err.strerror or err}") from err
        digest = _FILE_DIGESTS[memo] = hasher.hexdigest()
    return digest


def check_distinct_files(files: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse one file given for two roles (flag -> path; None: not given), also through another spelling or a
    symbolic link: writing one role's output there would replace the other's file (``--out`` = ``--data``).

    Raises:
        ValueError naming both flags.
    """
    seen: dict[str, str] = {}
    for flag, path in files.items():
        if path is None:
            continue
        key = os.path.realpath(os.path.expanduser(path))
        if key in seen:
            raise ValueError(f"{flag} {path}: is the same file as {seen[key]}; writing it would replace that file. "
                             "Give each its own file.")
        seen[key] = flag


def image_key(image: ImageSource) -> Any:
    """What makes two images the same image: the resolved file, or a dataset image's content key."""
    if isinstance(image, DatasetImage):
        return image.key
    if isinstance(image, (str, os.PathLike)):
        resolved = Path(image)
        return resolved.resolve() if resolved.exists() else resolved
    return id(image)
