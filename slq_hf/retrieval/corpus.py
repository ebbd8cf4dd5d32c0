"""Corpora to index: a folder of images, a JSONL of items, or any retrieval layout ``slq-hf eval`` reads.

A corpus is an ordered list of :class:`CorpusItem` (an id, an image and/or a text, free metadata). Readers:

- ``folder``: every image file under a folder, recursively (sorted by relative path; id = the relative path).
- ``items``: JSONL, one item a line: ``{"id"?, "image"?, "text"?, ...metadata}``. ``image`` is relative to the
  file's folder; an item with both is embedded as an ``{"image", "text"}`` pair; other keys are metadata. A line
  that cannot become an item (bad JSON, neither image nor text) is kept as a *bad item* with its reason, so one
  broken line does not stop a million-item build (``strict`` turns it into an error).
- ``karpathy`` / ``jsonl`` / ``karr`` / ``hf``: the evaluation layouts
  (:func:`slq_hf.evaluation.load_retrieval_dataset`): their images become the items, with the captions as
  ``metadata["captions"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import file_digest

EVAL_FORMATS = ("karpathy", "jsonl", "karr", "hf")
CORPUS_FORMATS = ("folder", "items", *EVAL_FORMATS)
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_RESERVED = ("id", "image", "text")


@dataclass(frozen=True)
class CorpusItem:
    """One thing to embed.

    Attributes:
        id: unique within the corpus.
        image: an image file path, a ``slq_hf.evaluation.DatasetImage`` or None.
        text: a text or None (both given: embedded as an ``{"image", "text"}`` pair).
        metadata: JSON-able extra fields, returned with search results.
        image_ref: the image as the data names it (relative path, dataset row), stored in the index.
        error: why the data line could not become an item (the item is then skipped as bad).
        where: the item's location for messages ("data.jsonl:12", "photos/a.jpg").
    """

    id: str
    image: Any = None
    text: str | None = None
    metadata: dict = field(default_factory=dict)
    image_ref: str | None = None
    error: str | None = None
    where: str = ""

    def key(self) -> str:
        """Digest of what the item is: id, text, metadata and the image file's path and bytes (a picture replaced by
        another of the same size with the mtime kept, as ``cp -p`` does, is another item: a resume re-encodes it)."""
        image = None
        if self.image is not None:
            if isinstance(self.image, (str, os.PathLike)):
                try:
                    image = [self.image_ref, file_digest(self.image)]
                except OSError:
                    image = [self.image_ref, None]
            else:
                image = [self.image_ref, getattr(self.image, "key", None)]
        payload = json.dumps([self.id, image, self.text, self.metadata, self.error], sort_keys=True, default=str)
        # surrogatepass: a bad item's undecodable file name still has a key (it is listed, never stored as text)
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Corpus:
    """Items in index order, where they came from (``source``, ``format``) and the folder image paths are under."""

    items: list[CorpusItem]
    source: str
    format: str
    root: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Corpus({self.source!r}, format={self.format!r}, items={len(self.items)})"


def printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable file-name bytes, ``"\\udce9"`` in JSON) shown as U+FFFD."""
    return text if _is_utf8(text) else text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_utf8(text: str) -> bool:
    """False for strings Parquet, JSON files and terminals cannot hold: lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_extensions() -> tuple[str, ...]:
    from ..processing import IMAGE_EXTENSIONS

    return tuple(ext.lower() for ext in IMAGE_EXTENSIONS)


def read_image_folder(folder: str | os.PathLike) -> Corpus:
    """Every image file (by extension) under ``folder``, recursively; hidden files and folders are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found.")
    extensions = _image_extensions()
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(dirpath, name).relative_to(folder).as_posix())
    if not found:
        raise ValueError(f"{folder}: no image files found (looked for {', '.join(extensions)}, recursively).")
    return Corpus([_folder_item(folder, rel) for rel in sorted(found)], str(folder), "folder",
                  root=str(folder.resolve()))


def _folder_item(folder: Path, rel: str) -> CorpusItem:
    """One image file; a name that is not valid UTF-8 (e.g. Latin-1 bytes) becomes a bad item, since ids and paths
    are stored as UTF-8 text."""
    if _is_utf8(rel):
        return CorpusItem(id=rel, image=str(folder / rel), image_ref=rel, where=rel)
    shown = printable(rel)
    return CorpusItem(id=shown, where=shown, error="the file name is not valid UTF-8; rename the file (e.g. with "
                      "`convmv -f latin1 -t utf8`) to index it")


def _item_from_record(record: Any, base: Path, where: str, line: int) -> CorpusItem:
    fallback_id = f"line-{line}"
    if not isinstance(record, dict):
        return CorpusItem(fallback_id, error=f"expected a JSON object, got {type(record).__name__}", where=where)
    raw_id = record.get("id", None)
    item_id = str(raw_id) if raw_id is not None else None
    broken = [key for key in _RESERVED if isinstance(record.get(key), str) and not _is_utf8(record[key])]
    if broken:  # a JSON "\udc.." escape: not text Parquet can store
        return CorpusItem(fallback_id if "id" in broken else item_id or fallback_id, where=where,
                          error=f"{', '.join(map(repr, broken))} holds a lone surrogate escape (\\udXXX), which is "
                                "not valid Unicode text")
    image, text = record.get("image"), record.get("text")
    metadata = {k: v for k, v in record.items() if k not in _RESERVED}
    if image is None and text is None:
        return CorpusItem(item_id or fallback_id, metadata=metadata, where=where,
                          error=f"the item has neither \"image\" nor \"text\" (keys: {sorted(record)})")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return CorpusItem(item_id or fallback_id, metadata=metadata, where=where,
                          error=f"\"image\" must be a non-empty path string, got {image!r}")
    if text is not None and not isinstance(text, str):
        return CorpusItem(item_id or fallback_id, metadata=metadata, where=where,
                          error=f"\"text\" must be a string, got {type(text).__name__}")
    path = None
    if image is not None:
        path = Path(image).expanduser()
        path = str(path if path.is_absolute() else base / path)
    return CorpusItem(item_id or (image if image is not None else fallback_id), image=path, text=text,
                      metadata=metadata, image_ref=image, where=where)


def read_items_jsonl(path: str | os.PathLike) -> Corpus:
    """JSONL items (module docstring). Raises on duplicate ids; keeps unusable lines as bad items."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found.")
    items, seen = [], {}
    with path.open("rb") as handle:  # bytes: one line that is not UTF-8 is a bad item, not a crash of the whole read
        for number, data in enumerate(handle, start=1):
            where = f"{path.name}:{number}"
            raw, problem = _decode_line(data, first=number == 1)
            if problem is not None:
                items.append(CorpusItem(f"line-{number}", error=problem, where=where))
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw, parse_constant=_refuse_constant)
            except json.JSONDecodeError as err:
                items.append(CorpusItem(f"line-{number}", error=f"invalid JSON ({err.msg}, column {err.colno})",
                                        where=where))
                continue
            except ValueError as err:  # NaN / Infinity
                items.append(CorpusItem(f"line-{number}", error=str(err), where=where))
                continue
            item = _item_from_record(record, path.parent, where, number)
            if item.id in seen:
                raise ValueError(f"{where}: id {item.id!r} was already used on line {seen[item.id]}; ids must be "
                                 "unique (give each line its own \"id\").")
            seen[item.id] = number
            items.append(item)
    if not items:
        raise ValueError(f"{path}: the file holds no items.")
    return Corpus(items, str(path), "items", root=str(path.parent.resolve()))


def _refuse_constant(name: str) -> Any:
    """Python's JSON reader accepts NaN and Infinity, which JSON does not: stored as metadata they would come out of
    ``slq-hf search --json`` (and go to a Qdrant server) as invalid JSON."""
    raise ValueError(f"{name} is not valid JSON (Python wrote it for a float NaN/inf); write null or a string instead")


def _decode_line(data: bytes, first: bool) -> tuple[str, str | None]:
    """(text of a JSONL line, None) or ("", why it is not UTF-8). A UTF-8 byte-order mark (Windows editors write
    one) opening the file is dropped: json.loads refuses it, which lost the first item."""
    if first and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return "", (f"the line is not UTF-8 text (byte 0x{data[err.start]:02x} at byte {err.start + 1}); save the "
                    "file as UTF-8")


def _unique_ids(ids: list[str], refs: list[str]) -> list[str]:
    """Display names as ids, except names shared by several images (``0.png`` in two Karpathy folders): those
    take their reference (relative path or row), so every id names one item."""
    counts: dict[str, int] = {}
    for name in ids:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else ref for name, ref in zip(ids, refs)]


def _from_dataset(dataset, source: str, format: str, root: str | None) -> Corpus:
    captions: list[list[str]] = [[] for _ in dataset.images]
    for text, owner in zip(dataset.texts, dataset.text_to_image):
        captions[owner].append(text)
    refs, ids = [], [str(image_id) for image_id in dataset.image_ids]
    for image, image_id in zip(dataset.images, ids):
        is_path = isinstance(image, (str, os.PathLike))
        refs.append(os.path.relpath(image, root) if is_path and root else (str(image) if is_path else image_id))
    items = []
    for image, item_id, ref, texts in zip(dataset.images, _unique_ids(ids, refs), refs, captions):
        is_path = isinstance(image, (str, os.PathLike))
        items.append(CorpusItem(item_id, image=str(image) if is_path else image, image_ref=ref,
                                metadata={"captions": texts} if texts else {}, where=ref))
    return Corpus(items, source, format, root=root)


def detect_corpus_format(path: str | os.PathLike) -> str:
    """folder of images -> "folder"; a ``datasets`` folder -> "hf"; .jsonl -> "items"; .json -> "karpathy"."""
    path = Path(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in _DATASETS_MARKERS):
            return "hf"
        return "folder"
    if not path.exists():
        raise FileNotFoundError(f"{path}: data not found.")
    if path.suffix == ".jsonl":
        return "items"
    if path.suffix == ".json":
        return "karpathy"
    raise ValueError(f"{path}: cannot tell the layout from the suffix {path.suffix!r}; pass format= (--format) as "
                     f"one of {list(CORPUS_FORMATS)}.")


def read_corpus(path: str | os.PathLike, format: str | None = None, *, split: str | None = None,
                image_root: str | os.PathLike | None = None, **eval_kwargs) -> Corpus:
    """Read a corpus in any supported layout (module docstring); ``format`` None/"auto" guesses it.

    Args:
        split: evaluation layouts only: the split to index (None = every line).
        image_root: karpathy only: the folder ``filepath/filename`` is relative to.
        **eval_kwargs: forwarded to ``load_retrieval_dataset`` (``text_field``, ``image_column``, ...).
    """
    format = detect_corpus_format(path) if format in (None, "auto") else format
    ignored = [name for name, value in (("split", split), ("image_root", image_root), *eval_kwargs.items())
               if value is not None]
    if format in ("folder", "items") and ignored:  # silently indexing everything would hide the mistake
        raise ValueError(f"{', '.join(ignored)} (--{ignored[0].replace('_', '-')}) only apply to the evaluation "
                         f"layouts {list(EVAL_FORMATS)}; {path} is read as {format!r}, which has none. Drop the "
                         "option, or pass --format.")
    if format == "folder":
        return read_image_folder(path)
    if format == "items":
        return read_items_jsonl(path)
    if format not in EVAL_FORMATS:
        raise ValueError(f"format={format!r} is not supported; expected one of {list(CORPUS_FORMATS)} or 'auto'.")
    from ..evaluation import load_retrieval_dataset

    dataset = load_retrieval_dataset(path, format, split, image_root=image_root, check_files=False, **eval_kwargs)
    base = Path(path)
    root = Path(image_root) if image_root is not None else (base if base.is_dir() else base.parent)
    return _from_dataset(dataset, str(path), format, str(root.resolve()))
