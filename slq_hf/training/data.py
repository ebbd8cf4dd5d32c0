"""Training data readers: JSONL pair files and ``datasets`` image/text datasets, as map-style torch datasets.

Images are NOT opened here: the collator opens them, so a corrupt file costs one skipped example rather than the
epoch (see ``SLQDataCollator(strict=...)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .collator import PAIR_KEYS, SOURCE_KEY, example_roles


class PairDataset(Dataset):
    """A list of training examples (``{"image", "text"}`` or ``{"query", "positive", "negative"?}`` dicts).

    The keys of every example are checked at construction, so a format error shows up before training starts.
    """

    def __init__(self, examples: list[dict[str, Any]]):
        if not isinstance(examples, (list, tuple)):
            raise ValueError(f"PairDataset expects a list of example dicts, got {type(examples).__name__}.")
        for index, example in enumerate(examples):
            example_roles(example, index)
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def _resolve(path: Any, root: Path) -> Any:
    if isinstance(path, str) and path.strip() and not os.path.isabs(os.path.expanduser(path)):
        return str(root / path)
    return path


def _jsonl_item(value: Any, root: Path, where: str, role: str) -> Any:
    """A JSONL item: a string is a TEXT (never guessed to be a path); ``{"image": path, "text"?: str}`` an image."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"image", "text"})
        if unknown or not value:
            raise ValueError(f"{where}: {role!r} has keys {sorted(value)}; an item is a text string or "
                             "{'image': 'path/to/file.jpg'} with an optional 'text'.")
        if "image" in value and not isinstance(value["image"], str):
            raise ValueError(f"{where}: {role!r}['image'] is {type(value['image']).__name__}; in JSONL an image is "
                             "a path string (relative to the JSONL file or absolute).")
        return {**value, "image": _resolve(value["image"], root)} if "image" in value else value
    raise ValueError(f"{where}: {role!r} is {type(value).__name__}; an item is a text string or {{'image': path, "
                     "'text'?: str}.")


def read_jsonl(path: str | os.PathLike) -> PairDataset:
    """Read a JSONL file of training pairs; relative image paths are resolved from the file's folder.

    One JSON object per line, either ``{"image": "imgs/0001.jpg", "text": "a dog on a beach"}`` or the general form
    ``{"query": item, "positive": item, "negative": item}`` (negative optional) where an item is a text string,
    ``{"image": path}`` or ``{"image": path, "text": str}``. Blank lines are ignored. Every example carries
    ``"_source": "<file>:<line>"`` so errors and skip warnings point at the line.

    Raises:
        FileNotFoundError if the file does not exist; ValueError naming the line for invalid JSON or keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Training data file {str(path)!r} does not exist.")
    root = path.resolve().parent
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err}). Each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            record[SOURCE_KEY] = where
            example_roles(record)  # key check, message names the line through _source
            if "query" in record:
                example = {role: _jsonl_item(record[role], root, where, role) for role in PAIR_KEYS if role in record}
            else:
                if not isinstance(record["image"], str):
                    raise ValueError(f"{where}: 'image' is {type(record['image']).__name__}; in JSONL an image is a "
                                     "path string (relative to the JSONL file or absolute).")
                example = {"image": _resolve(record["image"], root), "text": record["text"]}
            example[SOURCE_KEY] = where
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty).")
    return PairDataset(examples)


class HFPairDataset(Dataset):
    """Image/text pairs from a ``datasets.Dataset`` with an image column and a text column.

    A text column holding lists of captions (COCO: five per image) yields one pair per caption. A ``datasets``
    Image column is read with ``decode=False`` so images are decoded by the collator (a corrupt image is skipped
    there, not raised inside the dataloader). A column of path strings is resolved against ``image_root``.

    Args:
        dataset: a ``datasets.Dataset``.
        image_column / text_column: column names.
        image_root: folder that relative image paths are relative to (default: the working directory).
    """

    def __init__(self, dataset: Any, image_column: str = "image", text_column: str = "text",
                 image_root: str | os.PathLike | None = None):
        columns = list(getattr(dataset, "column_names", []) or [])
        missing = [c for c in (image_column, text_column) if c not in columns]
        if missing:
            raise ValueError(f"HFPairDataset: column(s) {missing} not in the dataset (columns: {columns}); pass "
                             "image_column=... and text_column=...")
        import datasets

        dataset = dataset.select_columns([image_column, text_column])
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        texts = dataset[text_column]
        # (row, caption index or None): one pair per caption when the column holds lists.
        self._index = [(row, j) for row, text in enumerate(texts)
                       for j in (range(len(text)) if isinstance(text, (list, tuple)) else [None])]
        self.dataset = dataset
        self.image_column, self.text_column = image_column, text_column
        self.image_root = Path(image_root).expanduser() if image_root is not None else None

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, caption = self._index[index]
        record = self.dataset[row]
        image, text = record[self.image_column], record[self.text_column]
        if caption is not None:
            text = text[caption]
        if self.image_root is not None:
            image = _resolve(image, self.image_root)
        return {"image": image, "text": text, SOURCE_KEY: f"row {row}" + ("" if caption is None else f"[{caption}]")}


def load_training_data(path: str | os.PathLike, image_column: str = "image", text_column: str = "text"):
    """A JSONL file (:func:`read_jsonl`) or a folder written by ``datasets``' ``save_to_disk`` (HFPairDataset)."""
    path = Path(path).expanduser()
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(loaded)}; point at one split's folder.")
        return HFPairDataset(loaded, image_column, text_column, image_root=path)
    return read_jsonl(path)
