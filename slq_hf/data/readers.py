"""One table of readers for image+text data (READERS), each yielding Records. The formats:

  jsonl     one JSON object a line, image paths relative to the file: {"image": "a.jpg", "text": "a dog"} ("texts",
            "caption", "captions": one caption or a list; lines naming the same image add captions); training's
            {"query": item, "positive": item, "negative"?: item}, an item being a text or {"image": path, "text"?};
            composed queries {"reference": "a.jpg", "text": "make it red", "target": "b.jpg"}. A plain string is
            always a text, even one that names a file ("IMG_0042.JPG").
  karpathy  Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json): {"images": [{"filename", "filepath"?,
            "split", "sentences": [{"raw"}]}]}; images at IMAGE_ROOT/filepath/filename (--image-root, image_root=;
            default: the JSON's folder).
  karr      KARR-Bench layout, one line per image: {"image": "a.png", "knowledge": "...", "caption"?: "...",
            "id"?}; --text-field (text_field=) caption reads the explicit captions instead.
  hf        a `datasets` Dataset/DatasetDict, save_to_disk folder or folder load_dataset reads, with an image column
            and a text column (a caption or a list of captions per row).
An optional "split" field on jsonl/karr lines is filtered by --split (split=). Errors name the file and line.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .records import (
    DataFormatError,
    DatasetImage,
    Item,
    Record,
    captions,
    image_file_problem,
    json_lines,
    read_text,
    resolve_image,
)

TEXT_KEYS = ("text", "texts", "caption", "captions")
PAIR_KEYS = ("query", "positive", "negative")
# The keys that give an item a role, each in one form of line only, and what to write instead when a line mixes them.
_PAIR_FORM = ('{"query": {"image": "a.jpg"}, "positive": "its caption", "negative": ...} (an image item is '
              '{"image": "path"})')
_ROLE_KEYS = {"negative": f"a hard negative needs the pair form {_PAIR_FORM}.",
              "image": f"in a pair line an image is an item: {_PAIR_FORM}.",
              "reference": "a composed query is {\"reference\", \"text\", \"target\"} alone.",
              "target": "a composed query is {\"reference\", \"text\", \"target\"} alone."}
_FORM_ROLES = {"pair": {"negative"}, "composed": {"reference", "target"}, "image": {"image"}}
_HF_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "filepath", "file_name")
_HF_TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "raw", "txt", "sentence")


# ---------------------------------------------------------------------------------------------------- jsonl
def _pair_item(value: Any, role: str, base: Path, path: Path, line: int, check: bool) -> Item:
    text = value if isinstance(value, str) else value.get("text") if isinstance(value, dict) else None
    # An empty query or positive is an empty caption, an error when the file is read as on an {"image", "text"}
    # line (the collator would skip the example, evaluation fail without the line); an empty hard negative is
    # skipped by the collator, as documented.
    if role != "negative" and isinstance(text, str) and not text.strip():
        raise DataFormatError(path, f"{role!r} has an empty text {text!r}; give it a caption or drop the line.", line)
    if isinstance(value, str):
        return Item(text=value)
    if isinstance(value, dict) and value and set(value) <= {"image", "text"}:
        if text is not None and not isinstance(text, str):
            raise DataFormatError(path, f"{role!r}['text'] is {type(text).__name__}; expected a string.", line)
        if "image" not in value:
            return Item(text=text)
        return Item(resolve_image(value["image"], base, path, line, check, f"{role}['image']"), text, value["image"])
    shown = sorted(value) if isinstance(value, dict) else type(value).__name__
    raise DataFormatError(path, f"{role!r} is {shown}; an item is a text string or {{\"image\": \"path/to/file.jpg\", "
                          "\"text\"?: str}.", line)


def read_jsonl(path: str | os.PathLike, split: str | None = None, check_files: bool = True) -> Iterator[Record]:
    """Records of a JSONL file in any of its three line forms (see the module docstring)."""
    path = Path(path)
    base = path.resolve().parent
    for line, rec in json_lines(path, split):
        fields = {k: v for k, v in rec.items() if k not in (*PAIR_KEYS, "image", "reference", "target", *TEXT_KEYS)}
        where = dict(source=f"{path}:{line}", line=line, split=rec.get("split"), fields=fields)
        form = "pair" if "query" in rec or "positive" in rec else "composed" if (
            "reference" in rec or "target" in rec) else "image"
        stray = sorted(set(rec) & (_ROLE_KEYS.keys() - _FORM_ROLES[form]))
        if stray and (form != "image" or "image" in rec):  # a role of another form would be dropped without a word
            kind = "an image" if form == "image" else f"a {form}"
            raise DataFormatError(path, f"{kind} line cannot also have {stray} (it would be ignored); "
                                  f"{_ROLE_KEYS[stray[0]]}", line)
        if form == "pair":
            missing = [k for k in ("query", "positive") if k not in rec]
            if missing:
                raise DataFormatError(path, f"a pair line needs \"query\" and \"positive\" (\"negative\" optional); "
                                      f"missing {missing}.", line)
            items = {r: _pair_item(rec[r], r, base, path, line, check_files) for r in PAIR_KEYS if r in rec}
            yield Record(items["query"], (items["positive"],), items.get("negative"), **where)
        elif form == "composed":
            missing = [k for k in ("reference", "text", "target") if k not in rec]
            if missing:
                raise DataFormatError(path, "a composed line needs \"reference\", \"text\" and \"target\"; "
                                      f"missing {missing}.", line)
            if not isinstance(rec["text"], str) or not rec["text"].strip():
                raise DataFormatError(path, f"\"text\" must be a non-empty string, got {rec['text']!r}.", line)
            image = {k: resolve_image(rec[k], base, path, line, check_files, k) for k in ("reference", "target")}
            yield Record(Item(image["reference"], rec["text"], str(rec["reference"])),
                         (Item(image["target"], name=str(rec["target"])),), **where)
        elif "image" in rec:
            present = [k for k in TEXT_KEYS if k in rec]
            if len(present) != 1:
                raise DataFormatError(path, f"a pair line needs exactly one of {list(TEXT_KEYS)}; this line has "
                                      f"{present or 'none'}.", line)
            image = resolve_image(rec["image"], base, path, line, check_files)
            texts = captions(rec[present[0]], present[0], path, line)
            yield Record(Item(image, name=str(rec.get("id", rec["image"]))), tuple(Item(text=t) for t in texts),
                         **where)
        else:
            raise DataFormatError(path, "a line needs \"image\" plus a caption, \"query\"/\"positive\", or "
                                  f"\"reference\"/\"text\"/\"target\"; got keys {sorted(rec)}.", line)


def read_karr(path: str | os.PathLike, split: str | None = None, text_field: str = "knowledge",
              check_files: bool = True) -> Iterator[Record]:
    """KARR-Bench lines: one image, its ``knowledge`` caption (or explicit ``caption``), one line per image."""
    if text_field not in ("knowledge", "caption"):
        raise ValueError(f"text_field={text_field!r} (--text-field) is invalid; expected 'knowledge' or 'caption'.")
    path = Path(path)
    base, first_line = path.resolve().parent, {}
    for line, rec in json_lines(path, split):
        for key in ("image", text_field):
            if key not in rec:
                raise DataFormatError(path, f"a KARR line needs \"image\" and \"{text_field}\"; missing {key!r} "
                                      f"(keys: {sorted(rec)}).", line)
        text = rec[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(path, f"\"{text_field}\" must be one non-empty string, got {text!r}.", line)
        image = resolve_image(rec["image"], base, path, line, check_files)
        first = first_line.setdefault(image.resolve(), line)
        if first != line:
            raise DataFormatError(path, f"image {rec['image']!r} already appeared on line {first}; the KARR layout "
                                  "has one line (one knowledge caption) per image.", line)
        yield Record(Item(image, name=str(rec.get("id", rec["image"]))), (Item(text=text),), source=f"{path}:{line}",
                     line=line, split=rec.get("split"), fields={k: v for k, v in rec.items() if k != "image"})


# ------------------------------------------------------------------------------------------------- karpathy
def read_karpathy(path: str | os.PathLike, split: str | None = None, image_root: str | os.PathLike | None = None,
                  max_captions: int | None = None, check_files: bool = True) -> Iterator[Record]:
    """Karpathy-split JSON. ``split`` "train" includes "restval", as Karpathy's own loaders do; ``image_root``
    (default: the JSON's folder) holds ``filepath/filename``; ``max_captions`` keeps the first N per image."""
    if max_captions is not None and (isinstance(max_captions, bool) or not isinstance(max_captions, int)
                                     or max_captions < 1):
        raise ValueError(f"max_captions={max_captions!r} (--max-captions) is invalid; expected a positive integer.")
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataFormatError(path, "the file is empty; expected a Karpathy-split JSON object.")
    lines_hint = (" If it holds one JSON object a line, pass --format jsonl (format=\"jsonl\") or karr."
                  if _first_line_object(text) is not None else "")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}.{lines_hint}", err.lineno) from err
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        if isinstance(document, dict) and "images" not in document and not lines_hint:
            lines_hint = " If it is one JSON line, pass --format jsonl (format=\"jsonl\") or karr."
        raise DataFormatError(path, "expected a Karpathy-split JSON object with an \"images\" list "
                              "({\"images\": [{\"filename\", \"split\", \"sentences\": [{\"raw\"}]}]})."
                              + lines_hint)
    # Like the jsonl/karr readers: relative to the file itself (a symlinked JSON finds the images beside its target).
    root = Path(image_root).expanduser() if image_root is not None else path.resolve().parent
    wanted = None if split in (None, "all") else ({"train", "restval"} if split == "train" else {split})
    splits_seen, found = set(), False
    for n, entry in enumerate(document["images"]):
        filename = entry.get("filename") if isinstance(entry, dict) else None

        def fail(message: str, n: int = n, filename: Any = filename) -> DataFormatError:
            # JSON documents carry no per-entry line numbers; the entry's own string locates it for the user. Only on
            # failure: searching a 150 MB COCO file for every entry would take minutes.
            at = text.find(json.dumps(filename)) if isinstance(filename, str) and filename else -1
            label = f"images[{n}]" + (f" ({filename!r})" if isinstance(filename, str) else "")
            return DataFormatError(path, f"{label}: {message}", text.count("\n", 0, at) + 1 if at >= 0 else None)

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
        problem = image_file_problem(image) if check_files else None
        if problem is not None:
            raise fail(f"image file {problem}; pass image_root= (--image-root) pointing at the folder the images "
                       "live in.")
        found = True
        name = str(entry.get("cocoid", entry.get("imgid", filename)))
        yield Record(Item(image, name=name), tuple(Item(text=r) for r in raws[:max_captions]),
                     source=f"{path}: images[{n}]", split=entry.get("split"))
    if not found:
        raise DataFormatError(path, f"no image has split {split!r}; splits in the file: {sorted(splits_seen)}.")


# ------------------------------------------------------------------------------------------------------- hf
def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if given is not None and given not in columns:
        raise ValueError(f"{source}: column {given!r} is not in the dataset (columns: {columns}); pass "
                         f"{what}_column= (--{what}-column).")
    found = given if given is not None else next((name for name in candidates if name in columns), None)
    if found is not None:
        return found
    raise ValueError(f"{source}: cannot tell which column holds the {what}; columns are {columns}. Pass "
                     f"{what}_column= (--{what}-column).")


_CAPTION_KEYS = ("raw", "caption", "text", "sentence")


def _hf_captions(value: Any) -> Any:
    """A text cell as a caption or a list of them: a string, a list of strings, a list of ``{"raw": ...}``-style
    dicts (Karpathy's sentences), or the dict of lists ``datasets`` stores a ``Sequence({"raw": ...})`` feature as.
    Anything else is returned as is (``captions`` then names it)."""
    def text_of(entry: Any) -> Any:
        if not isinstance(entry, dict):
            return entry
        if len(entry) == 1:
            return next(iter(entry.values()))
        return next((entry[k] for k in _CAPTION_KEYS if k in entry), entry)

    if isinstance(value, dict):
        listed = text_of(value)
        return listed if isinstance(listed, (list, str)) else value
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [text_of(v) for v in value]
    return value


def load_hf(source: Any, split: str | None = None) -> tuple[Any, str]:
    """(``datasets.Dataset``, label) from a Dataset, a DatasetDict (``split`` picks one; None: its only split) or a
    local folder."""
    return _load_hf(source, split)[:2]


def _load_hf(source: Any, split: str | None) -> tuple[Any, str, str | None]:
    """:func:`load_hf` plus the split it picked (None for a single Dataset, which has none)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Reading `datasets` data needs the datasets package: "
                          "pip install 'slq_hf[training]'.") from err
    label = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
    if isinstance(source, (str, os.PathLike)):
        label, folder = str(source), Path(source).expanduser()
        if not folder.exists():
            raise DataFormatError(folder, "dataset folder not found.")
        saved = any((folder / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))
        try:  # a save_to_disk folder, or data files load_dataset reads
            source = (datasets.load_from_disk if saved else datasets.load_dataset)(str(folder))
        except Exception as err:  # datasets' own internals (an empty save_to_disk folder raises IndexError)
            raise DataFormatError(folder, f"datasets cannot load it ({type(err).__name__}: {err}); the hf format "
                                  "reads a save_to_disk folder or a folder of data files, and this is empty or "
                                  "neither.") from err
    if isinstance(source, (datasets.DatasetDict, dict)):
        if split is None and len(source) == 1:  # load_dataset puts a folder of data files in one "train" split
            split = next(iter(source))
        if split is None:
            raise ValueError(f"{label} holds a DatasetDict with splits {sorted(source)}; pick one (split=, --split) "
                             "or point at one split's folder.")
        if split not in source:
            raise ValueError(f"{label}: no split {split!r}; splits are {sorted(source)}.")
        source, picked = source[split], split
    else:
        picked = None
    if not isinstance(source, datasets.Dataset):
        raise ValueError(f"{label}: expected a datasets.Dataset or DatasetDict, got {type(source).__name__}.")
    return source, label, picked


def read_hf(source: Any, split: str | None = None, image_column: str | None = None, text_column: str | None = None,
            image_root: str | os.PathLike | None = None, check_files: bool = True) -> Iterator[Record]:
    """One record per row (a caption or a list of captions); columns are detected from common names when None.

    Image cells stay undecoded (:class:`DatasetImage`) until used; path strings, and Image cells holding only a
    relative path, resolve against ``image_root`` (default: the dataset folder, or the working directory for an
    in-memory dataset).
    """
    import datasets

    folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
    # A single Dataset has no splits: ``split`` picks nothing there, so its records claim none (a report or model
    # card would otherwise name "name:test" for data that has no test split).
    table, label, split = _load_hf(source, split)
    columns = list(table.column_names)
    image_column = _pick_column(columns, image_column, _HF_IMAGE_COLUMNS, "image", label)
    text_column = _pick_column(columns, text_column, _HF_TEXT_COLUMNS, "text", label)
    # An Image column is never read here (its cells can total gigabytes): rows refer to it as DatasetImage, decoded
    # when used, so a corrupt image fails (or is skipped in training) there. Path-string columns are read.
    lazy = isinstance(table.features[image_column], datasets.Image)
    if lazy:
        table = table.cast_column(image_column, datasets.Image(decode=False))
    table = table.select_columns(list(dict.fromkeys([image_column, text_column])))
    read = [text_column] if lazy else table.column_names
    root = Path(image_root or folder or Path.cwd()).expanduser()
    row = 0
    for batch in table.select_columns(read).iter(batch_size=256):
        for n, text in enumerate(batch[text_column]):
            where = f"{label}: row {row}"
            value = None if lazy else batch[image_column][n]
            if lazy or isinstance(value, dict) and (value.get("bytes") or value.get("path")):
                image, name = DatasetImage(table, image_column, row, root), str(row)
            elif isinstance(value, str):
                image, name = resolve_image(value, root, where, None, check_files), value
            else:
                raise ValueError(f"{where}: column {image_column!r} holds {type(value).__name__}, not an image.")
            values = captions(_hf_captions(text), text_column, where, None)
            yield Record(Item(image, name=name), tuple(Item(text=v) for v in values), source=where, split=split)
            row += 1
    if not row:
        raise ValueError(f"{label}: the dataset is empty.")


# ---------------------------------------------------------------------------------------------------- table
READERS: dict[str, Callable[..., Iterator[Record]]] = {"jsonl": read_jsonl, "karpathy": read_karpathy,
                                                       "karr": read_karr, "hf": read_hf}
FORMATS = tuple(READERS)


def detect_format(path: str | os.PathLike | Any) -> str:
    """Guess the reader: a ``datasets`` object or a folder -> hf; .json -> karpathy (unless it is JSON Lines: a
    first line that is a whole object without "images", more lines after it); .jsonl (any case) -> karr if its first
    record has "knowledge", else jsonl."""
    if not isinstance(path, (str, os.PathLike)) or Path(path).is_dir():
        return "hf"
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        if path.is_file():  # JSON Lines are often named .json: one object a line, no "images" list, is not Karpathy
            with path.open("rb") as handle:  # the head only: COCO's Karpathy JSON is 150 MB on one line
                first = _first_line_object(handle.read(1 << 16).decode("utf-8-sig", errors="replace"))
            if first is not None and "images" not in first:
                return "karr" if "knowledge" in first else "jsonl"
        return "karpathy"
    if suffix == ".jsonl":
        if not path.is_file():
            json_lines(path)  # raises, naming the file: not found
        with path.open("rb") as handle:  # the first record only: parsing the whole file here doubled the reading
            first = next((raw for raw in handle if raw.strip(b" \t\r\n\xef\xbb\xbf")), b"")  # blank, or a BOM
        try:
            record = json.loads(first.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "jsonl"  # the reader names the line and the problem
        return "karr" if isinstance(record, dict) and "knowledge" in record else "jsonl"
    if not path.exists():
        raise DataFormatError(path, "data file not found.")
    raise DataFormatError(path, f"cannot tell the format from the suffix {path.suffix!r}; pass format= (--format) "
                          f"as one of {list(FORMATS)}.")


def _first_line_object(text: str, limit: int = 1 << 16) -> dict | None:
    """The first non-blank line of ``text`` as a JSON object when the text has more lines after it (JSON Lines), else
    None. Only the first ``limit`` characters are looked at, so a 150 MB one-line Karpathy file costs nothing."""
    head = text[:limit].lstrip()
    end = head.find("\n")
    if end < 0 or not head[end:].strip():
        return None
    try:
        first = json.loads(head[:end])
    except json.JSONDecodeError:
        return None
    return first if isinstance(first, dict) else None


def read_records(source: str | os.PathLike | Any, format: str | None = None, split: str | None = None,
                 **options: Any) -> list[Record]:
    """Every record of ``source`` with the reader of ``format`` (None/"auto": :func:`detect_format`).

    ``options`` are the reader's own keywords (``image_root``, ``text_field``, ``image_column``...); None values are
    dropped, and an option the format does not take is an error rather than silently ignored.
    """
    format = detect_format(source) if format in (None, "auto") else format
    if format not in READERS:
        raise ValueError(f"format={format!r} (--format) is not supported; expected one of {list(FORMATS)} or 'auto'.")
    accepted = inspect.signature(READERS[format]).parameters
    options = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(options) - set(accepted))
    if wrong:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
        raise ValueError(f"{flags} does not apply to the {format} format (it takes "
                         f"{[k for k in accepted if k not in ('path', 'source', 'split')]}).")
    return list(READERS[format](source, split=split, **options))
