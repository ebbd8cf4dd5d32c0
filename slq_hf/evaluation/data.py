"""Retrieval datasets and the readers that build them from files.

A :class:`RetrievalDataset` is a list of candidate images, a list of captions with the index of the image each one
belongs to (several captions per image allowed), and optionally composed queries (reference image + text ->
target image). Readers:

- ``karpathy``: Karpathy-split JSON (COCO, Flickr30K): ``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}, ...]}, ...]}``. Images are looked up at ``image_root / filepath / filename``.
- ``jsonl``: one JSON object a line, image paths relative to the file. A pair line is ``{"image", "text"}`` (or
  ``"texts"``/``"caption"``/``"captions"`` holding one caption or a list); lines naming the same image add captions
  to it. A composed line is ``{"reference", "text", "target"}``. An optional ``"split"`` selects lines.
- ``karr``: KARR-Bench-style knowledge retrieval, one JSON object a line, one line per image::

      {"image": "scenes/0001.png", "knowledge": "the shape with three corners, coloured like blood",
       "caption": "a red triangle", "split": "test", "id": "0001"}

  ``image`` (relative to the file) and ``knowledge`` (the one knowledge caption: it describes the image only
  through world knowledge, never by naming what is shown) are required; ``caption`` (the explicit caption, used
  with ``text_field="caption"``), ``split`` and ``id`` are optional. An image may appear on one line only.
- ``hf``: a ``datasets.Dataset``/``DatasetDict`` (or a folder written by ``save_to_disk``, or a local folder
  ``datasets.load_dataset`` reads) with an image column and a text column holding a caption or a list of captions;
  rows holding the same image are merged.

Errors are :class:`DataFormatError` (a ValueError) naming the file and, where there is one, the line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

FORMATS = ("karpathy", "jsonl", "karr", "hf")
_TEXT_KEYS = ("text", "texts", "caption", "captions")
_HF_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "filepath", "file_name")
_HF_TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "raw", "txt", "sentence")


class DataFormatError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file and, if known, the line."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclass(frozen=True)
class DatasetImage:
    """A lazily loaded image in a ``datasets`` table (row ``row`` of ``column``); ``key`` identifies its content."""

    dataset: Any = field(repr=False, compare=False)
    column: str
    row: int
    key: str

    def load(self) -> Image.Image:
        value = self.dataset[self.row][self.column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        raise ValueError(f"Row {self.row} of column {self.column!r} holds no image bytes or path.")


ImageSource = str | os.PathLike | Image.Image | DatasetImage


@dataclass(frozen=True)
class ComposedQuery:
    """Composed image retrieval query: ``reference`` image (index) modified by ``text`` should find ``target``."""

    reference: int
    text: str
    target: int


@dataclass
class RetrievalDataset:
    """Images, captions and (optionally) composed queries for retrieval evaluation.

    Attributes:
        images: (I) candidate images: paths, PIL images or :class:`DatasetImage` references (loaded lazily).
        texts: (T) captions.
        text_to_image: (T) index into ``images`` of the image each caption describes.
        composed: composed queries; their reference and target index into ``images``.
        name: shown in reports.
        image_ids: (I) display names (file names, ids); defaults to the index.
    """

    images: list[ImageSource]
    texts: list[str]
    text_to_image: list[int]
    composed: list[ComposedQuery] = field(default_factory=list)
    name: str = "dataset"
    image_ids: list[str] | None = None

    def __post_init__(self) -> None:
        self.images, self.texts, self.text_to_image = list(self.images), list(self.texts), list(self.text_to_image)
        num_images = len(self.images)
        if len(self.texts) != len(self.text_to_image):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.text_to_image)} text_to_image "
                             "entries; give one image index per text.")
        for n, (text, owner) in enumerate(zip(self.texts, self.text_to_image)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{self.name}: text {n} is {text!r}; captions must be non-empty strings.")
            if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner < num_images:
                raise ValueError(f"{self.name}: text {n} points at image {owner!r}, outside [0, {num_images}).")
        for n, query in enumerate(self.composed):
            for role in ("reference", "target"):
                index = getattr(query, role)
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_images:
                    raise ValueError(f"{self.name}: composed query {n} has {role} {index!r}, outside "
                                     f"[0, {num_images}).")
            if query.reference == query.target:
                raise ValueError(f"{self.name}: composed query {n} has the same reference and target image.")
            if not isinstance(query.text, str) or not query.text.strip():
                raise ValueError(f"{self.name}: composed query {n} has an empty text.")
        if not self.texts and not self.composed:
            raise ValueError(f"{self.name}: no captions and no composed queries; nothing to evaluate.")
        if self.image_ids is None:
            self.image_ids = [str(n) for n in range(num_images)]
        elif len(self.image_ids) != num_images:
            raise ValueError(f"{self.name}: {len(self.image_ids)} image_ids for {num_images} images.")

    @classmethod
    def from_pairs(cls, images: Sequence[ImageSource], captions: Sequence[str | Sequence[str]],
                   name: str = "dataset") -> RetrievalDataset:
        """One image per entry, each with one caption (``str``) or several (a list)."""
        if len(images) != len(captions):
            raise ValueError(f"{name}: {len(images)} images but {len(captions)} caption entries.")
        texts, owners = [], []
        for index, entry in enumerate(captions):
            entry = [entry] if isinstance(entry, str) else list(entry)
            if not entry:
                raise ValueError(f"{name}: image {index} has no caption.")
            texts.extend(entry)
            owners.extend([index] * len(entry))
        return cls(list(images), texts, owners, name=name)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"RetrievalDataset(name={self.name!r}, images={len(self.images)}, texts={len(self.texts)}, "
                f"composed={len(self.composed)})")


# ---------------------------------------------------------------------------------------------------- helpers
def _line_of(text: str, needle: str) -> int | None:
    # JSON documents carry no per-entry line numbers; finding the entry's own string locates it for the user.
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataFormatError(path, "data file not found.")
    if path.is_dir():
        raise DataFormatError(path, "is a directory; expected a data file (use --format hf for a datasets folder).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, f"not UTF-8 text ({err}); is this really a JSON/JSONL file?") from err


def _resolve_image(raw: Any, base: Path, path: Path, line: int | None, check: bool, what: str = "image") -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise DataFormatError(path, f"{what!r} must be a non-empty path string, got {raw!r}.", line)
    resolved = Path(raw).expanduser()
    resolved = resolved if resolved.is_absolute() else base / resolved
    if check and not resolved.is_file():
        raise DataFormatError(path, f"{what} file {raw!r} not found (looked at {resolved}).", line)
    return resolved


def _split_filter(records: list[tuple[int, dict]], split: str | None, path: Path) -> list[tuple[int, dict]]:
    """Keep the lines of ``split`` when the file has a split field; files without one are a single split."""
    if split is None or split == "all":
        return records
    tagged = [(line, rec) for line, rec in records if "split" in rec]
    if not tagged:
        return records
    if len(tagged) != len(records):
        line = next(line for line, rec in records if "split" not in rec)
        raise DataFormatError(path, "this line has no \"split\" while other lines do; give every line a split.", line)
    kept = [(line, rec) for line, rec in records if rec["split"] == split]
    if not kept:
        found = sorted({str(rec["split"]) for _, rec in records})
        raise DataFormatError(path, f"no line has split {split!r}; splits in the file: {found}.")
    return kept


def _name(path: Path, split: str | None, records: list[tuple[int, dict]]) -> str:
    # Only name a split the file actually has: a file without split fields is not "the test split".
    filtered = split not in (None, "all") and any("split" in rec for _, rec in records)
    return f"{path.stem}:{split}" if filtered else path.stem


def _read_jsonl_records(path: Path) -> list[tuple[int, dict]]:
    records = []
    for number, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}.", number) from err
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}.", number)
        records.append((number, record))
    if not records:
        raise DataFormatError(path, "the file holds no records.")
    return records


def _captions(record: dict, path: Path, line: int) -> list[str]:
    present = [k for k in _TEXT_KEYS if k in record]
    if len(present) != 1:
        detail = f"has {present}" if present else "has none"
        raise DataFormatError(path, f"a pair line needs exactly one of {list(_TEXT_KEYS)}; this line {detail}.", line)
    value = record[present[0]]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise DataFormatError(path, f"{present[0]!r} must be a non-empty caption or a list of them, got "
                              f"{value!r}.", line)
    return values


class _ImageTable:
    """Images in order of first appearance, merged by resolved path."""

    def __init__(self) -> None:
        self.images: list[Path] = []
        self.ids: list[str] = []
        self.index: dict[Path, int] = {}

    def add(self, resolved: Path, display: str) -> int:
        key = resolved.resolve() if resolved.exists() else resolved
        if key not in self.index:
            self.index[key] = len(self.images)
            self.images.append(resolved)
            self.ids.append(display)
        return self.index[key]


# ---------------------------------------------------------------------------------------------------- readers
def read_karpathy(path: str | os.PathLike, split: str | None = "test", image_root: str | os.PathLike | None = None,
                  max_captions: int | None = None, check_files: bool = True) -> RetrievalDataset:
    """Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Args:
        path: the JSON file.
        split: "test", "val", "train" (includes "restval", as Karpathy's own loaders do) or None/"all".
        image_root: folder that ``filepath/filename`` is relative to; defaults to the JSON file's folder.
        max_captions: keep at most this many captions per image (COCO has a few images with 6-7; the common
            5K protocol keeps 5). None keeps all.
        check_files: verify every image exists now rather than failing mid-encode.
    """
    if max_captions is not None and (isinstance(max_captions, bool) or not isinstance(max_captions, int)
                                     or max_captions < 1):
        raise ValueError(f"max_captions={max_captions!r} is invalid; expected a positive integer or None.")
    path = Path(path)
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}.", err.lineno) from err
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataFormatError(path, "expected a Karpathy-split JSON object with an \"images\" list "
                              "({\"images\": [{\"filename\", \"split\", \"sentences\": [{\"raw\"}]}]}).")
    root = Path(image_root) if image_root is not None else path.parent
    wanted = None if split in (None, "all") else ({"train", "restval"} if split == "train" else {split})
    images, ids, texts, owners = [], [], [], []
    splits_seen = set()
    for n, entry in enumerate(document["images"]):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        where = f"images[{n}]" + (f" ({filename!r})" if isinstance(filename, str) else "")

        def fail(message: str, where: str = where, filename: Any = filename) -> DataFormatError:
            # Located only on failure: searching a 150 MB COCO file for every entry would take minutes.
            line = _line_of(text, json.dumps(filename)) if isinstance(filename, str) and filename else None
            return DataFormatError(path, f"{where}: {message}", line)

        if not isinstance(entry, dict) or not isinstance(filename, str) or not filename:
            raise fail("every image entry needs a \"filename\" string.")
        splits_seen.add(str(entry.get("split")))
        if wanted is not None and entry.get("split") not in wanted:
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise fail("\"sentences\" must be a non-empty list of {\"raw\": ...}.")
        raws = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
        if not all(isinstance(r, str) and r.strip() for r in raws):
            raise fail("every sentence needs a non-empty \"raw\" string.")
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise fail(f"\"filepath\" must be a string, got {filepath!r}.")
        image = root / filepath / filename
        if check_files and not image.is_file():
            raise fail(f"image file not found at {image}; pass image_root= (--image-root) pointing at the folder "
                       "the images live in.")
        raws = raws[:max_captions] if max_captions else raws
        texts.extend(raws)
        owners.extend([len(images)] * len(raws))
        images.append(image)
        ids.append(str(entry.get("cocoid", entry.get("imgid", filename))))
    if not images:
        raise DataFormatError(path, f"no image has split {split!r}; splits in the file: {sorted(splits_seen)}.")
    name = f"{path.stem}:{split}" if split else path.stem
    return RetrievalDataset(images, texts, owners, name=name, image_ids=ids)


def read_jsonl(path: str | os.PathLike, split: str | None = "test", check_files: bool = True) -> RetrievalDataset:
    """JSONL pairs and/or composed queries (see the module docstring); image paths are relative to the file."""
    path = Path(path)
    all_records = _read_jsonl_records(path)
    records = _split_filter(all_records, split, path)
    table = _ImageTable()
    texts, owners, composed = [], [], []
    for line, record in records:
        if "reference" in record or "target" in record:
            missing = [k for k in ("reference", "text", "target") if k not in record]
            if missing:
                raise DataFormatError(path, f"a composed line needs \"reference\", \"text\" and \"target\"; "
                                      f"missing {missing}.", line)
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(path, f"\"text\" must be a non-empty string, got {text!r}.", line)
            reference = table.add(_resolve_image(record["reference"], path.parent, path, line, check_files,
                                                 "reference"), str(record["reference"]))
            target = table.add(_resolve_image(record["target"], path.parent, path, line, check_files, "target"),
                               str(record["target"]))
            if reference == target:
                raise DataFormatError(path, "reference and target are the same image.", line)
            composed.append(ComposedQuery(reference, text, target))
            continue
        if "image" not in record:
            raise DataFormatError(path, f"a line needs \"image\" plus a caption, or \"reference\"/\"text\"/"
                                  f"\"target\"; got keys {sorted(record)}.", line)
        index = table.add(_resolve_image(record["image"], path.parent, path, line, check_files),
                          str(record["image"]))
        captions = _captions(record, path, line)
        texts.extend(captions)
        owners.extend([index] * len(captions))
    return RetrievalDataset(table.images, texts, owners, composed, name=_name(path, split, all_records),
                            image_ids=table.ids)


def read_karr(path: str | os.PathLike, split: str | None = "test", text_field: str = "knowledge",
              check_files: bool = True) -> RetrievalDataset:
    """KARR-Bench layout (see the module docstring): one knowledge caption per image.

    Args:
        text_field: "knowledge" (the benchmark) or "caption" (the explicit captions of the same images, as a
            control).
    """
    if text_field not in ("knowledge", "caption"):
        raise ValueError(f"text_field={text_field!r} is invalid; expected 'knowledge' or 'caption'.")
    path = Path(path)
    all_records = _read_jsonl_records(path)
    records = _split_filter(all_records, split, path)
    table = _ImageTable()
    texts, owners, first_line = [], [], {}
    for line, record in records:
        for key in ("image", text_field):
            if key not in record:
                raise DataFormatError(path, f"a KARR line needs \"image\" and \"{text_field}\"; missing "
                                      f"{key!r} (keys: {sorted(record)}).", line)
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(path, f"\"{text_field}\" must be one non-empty string, got {text!r}.", line)
        index = table.add(_resolve_image(record["image"], path.parent, path, line, check_files),
                          str(record.get("id", record["image"])))
        if index in first_line:
            raise DataFormatError(path, f"image {record['image']!r} already appeared on line {first_line[index]}; "
                                  "the KARR layout has one line (one knowledge caption) per image.", line)
        first_line[index] = line
        texts.append(text)
        owners.append(index)
    return RetrievalDataset(table.images, texts, owners, name=f"{_name(path, split, all_records)}:{text_field}",
                            image_ids=table.ids)


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{source}: no column {given!r}; columns are {columns}.")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{source}: cannot tell which column holds the {what}; columns are {columns}. Pass "
                     f"{what}_column= (--{what}-column).")


def read_hf(source: Any, split: str | None = "test", image_column: str | None = None,
            text_column: str | None = None) -> RetrievalDataset:
    """A ``datasets`` dataset with an image column and a text column (a caption or a list of captions per row).

    Args:
        source: a ``Dataset``, a ``DatasetDict`` (``split`` picks one), a ``save_to_disk`` folder, or a local folder
            ``datasets.load_dataset`` can read (imagefolder, parquet, ...).
        image_column / text_column: detected from common names ("image", "caption", "sentences", ...) when None.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Reading `datasets` data needs the datasets package: "
                          "pip install 'slq_hf[training]'.") from err

    if isinstance(source, (str, os.PathLike)):
        label = str(source)
    else:
        label = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
    base = Path(source) if isinstance(source, (str, os.PathLike)) else Path.cwd()
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise DataFormatError(folder, "dataset folder not found.")
        if any((folder / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            source = datasets.load_from_disk(str(folder))
        else:
            source = datasets.load_dataset(str(folder))
    if isinstance(source, (datasets.DatasetDict, dict)):
        if split not in source:
            raise ValueError(f"{label}: no split {split!r}; splits are {sorted(source)}.")
        source = source[split]
    if not isinstance(source, datasets.Dataset):
        raise ValueError(f"{label}: expected a datasets.Dataset or DatasetDict, got {type(source).__name__}.")
    columns = list(source.column_names)
    image_column = _pick_column(columns, image_column, _HF_IMAGE_COLUMNS, "image", label)
    text_column = _pick_column(columns, text_column, _HF_TEXT_COLUMNS, "text", label)
    feature = source.features[image_column]
    if isinstance(feature, datasets.Image):
        # Undecoded rows are {"bytes", "path"}: hashing bytes identifies images without decoding the whole set.
        source = source.cast_column(image_column, datasets.Image(decode=False))

    source = source.select_columns(list(dict.fromkeys([image_column, text_column])))
    images: list[ImageSource] = []
    ids, texts, owners, index_of = [], [], [], {}
    # Row batches keep memory bounded: a whole undecoded image column of COCO would be ~1 GB of bytes.
    rows = ((value, text) for batch in source.iter(batch_size=256)
            for value, text in zip(batch[image_column], batch[text_column]))
    for row, (value, text) in enumerate(rows):
        where = f"{label}: row {row}"
        if isinstance(value, str):
            image_path = Path(value) if Path(value).is_absolute() else base / value
            if not image_path.is_file():
                raise ValueError(f"{where}: image file {value!r} not found (looked at {image_path}).")
            key, image = f"path:{image_path.resolve()}", image_path
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if value.get("bytes"):
                key = "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
            else:
                key = f"path:{value['path']}"
            image = DatasetImage(source, image_column, row, key)
        else:
            raise ValueError(f"{where}: column {image_column!r} holds {type(value).__name__}, not an image.")
        captions = _hf_captions(text, f"{where}, column {text_column!r}")
        if key not in index_of:
            index_of[key] = len(images)
            images.append(image)
            ids.append(str(value) if isinstance(value, str) else str(value.get("path") or row))
        texts.extend(captions)
        owners.extend([index_of[key]] * len(captions))
    if not images:
        raise ValueError(f"{label}: the dataset is empty.")
    return RetrievalDataset(images, texts, owners, name=f"{Path(label).name}:{split}" if split else label,
                            image_ids=ids)


def _hf_captions(value: Any, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if isinstance(values, list):
        values = [v.get("raw") if isinstance(v, dict) else v for v in values]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: expected a caption or a non-empty list of captions, got {value!r}.")
    return values


def detect_format(path: str | os.PathLike | Any) -> str:
    """Guess the reader: a ``datasets`` object or a folder -> hf; .json -> karpathy; .jsonl -> karr if its first
    record has "knowledge", else jsonl."""
    if not isinstance(path, (str, os.PathLike)):
        return "hf"
    path = Path(path)
    if path.is_dir():
        return "hf"
    if path.suffix == ".json":
        return "karpathy"
    if path.suffix == ".jsonl":
        first = _read_jsonl_records(path)[0][1]
        return "karr" if "knowledge" in first else "jsonl"
    if not path.exists():
        raise DataFormatError(path, "data file not found.")
    raise DataFormatError(path, f"cannot tell the format from the suffix {path.suffix!r}; pass format= (--format) "
                          f"as one of {list(FORMATS)}.")


def load_retrieval_dataset(path: str | os.PathLike | Any, format: str | None = None, split: str | None = "test",
                           *, image_root: str | os.PathLike | None = None, text_field: str = "knowledge",
                           image_column: str | None = None, text_column: str | None = None,
                           max_captions: int | None = None, check_files: bool = True) -> RetrievalDataset:
    """Read any supported layout; ``format`` None/"auto" guesses it with :func:`detect_format`."""
    format = detect_format(path) if format in (None, "auto") else format
    if format == "karpathy":
        return read_karpathy(path, split, image_root=image_root, max_captions=max_captions, check_files=check_files)
    if format == "jsonl":
        return read_jsonl(path, split, check_files=check_files)
    if format == "karr":
        return read_karr(path, split, text_field=text_field, check_files=check_files)
    if format == "hf":
        return read_hf(path, split, image_column=image_column, text_column=text_column)
    raise ValueError(f"format={format!r} is not supported; expected one of {list(FORMATS)} or 'auto'.")
