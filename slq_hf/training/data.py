"""Training data: the records of ``slq_hf.data``'s readers as a map-style torch dataset of pair examples.

Images are NOT opened here: the collator opens them, so a corrupt file costs one skipped example rather than the
epoch (see ``SLQDataCollator(strict=...)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..data import DatasetImage, Item, Record, read_records
from .collator import SOURCE_KEY, example_roles


def _raw(value: Any) -> Any:
    # A dataset image is fetched only when its example is used (in a dataloader worker), undecoded.
    return value.raw() if isinstance(value, DatasetImage) else value


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
        example = self.examples[index]
        return {k: {**v, "image": _raw(v["image"])} if isinstance(v, dict) and "image" in v else _raw(v)
                for k, v in example.items()}


def _item(item: Item) -> dict[str, Any]:
    """The collator's form of an item; a text stays ``{"text": ...}`` so it is never taken for an image path."""
    image = str(item.image) if isinstance(item.image, Path) else item.image
    return {k: v for k, v in (("image", image), ("text", item.text)) if v is not None}


def examples_from_records(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One pair example per (record, positive); image -> caption records keep the plain ``{"image", "text"}``."""
    examples = []
    for record in records:
        for n, positive in enumerate(record.positives):
            source = record.source + (f"[{n}]" if len(record.positives) > 1 else "")
            if (record.query.text is None and record.negative is None and positive.image is None
                    and positive.text is not None):
                example = {"image": _item(record.query)["image"], "text": positive.text}
            else:
                example = {"query": _item(record.query), "positive": _item(positive)}
                if record.negative is not None:
                    example["negative"] = _item(record.negative)
            examples.append({**example, SOURCE_KEY: source})
    return examples


def read_jsonl(path: str | os.PathLike) -> PairDataset:
    """Read a JSONL file of training pairs (any ``slq_hf.data`` JSONL form); image paths are relative to the file.

    ``{"image": "imgs/0001.jpg", "text": "a dog on a beach"}`` (or ``"texts"``/``"captions"``: one pair per
    caption) or ``{"query": item, "positive": item, "negative"?: item}`` where an item is a text string or
    ``{"image": path, "text"?: str}``. Every example carries ``"_source": "<file>:<line>"`` for messages.
    Raises DataFormatError (a ValueError) naming the file and line.
    """
    return PairDataset(examples_from_records(read_records(path, "jsonl", check_files=False)))


class HFPairDataset(PairDataset):
    """Image/text pairs from a ``datasets.Dataset``: one pair per caption when the text column holds lists.

    Image cells are kept undecoded and fetched per example, so the collator decodes them (a corrupt image is
    skipped there). A column of path strings is resolved against ``image_root`` (default: the working directory).
    """

    def __init__(self, dataset: Any, image_column: str = "image", text_column: str = "text",
                 image_root: str | os.PathLike | None = None):
        super().__init__(examples_from_records(read_records(
            dataset, "hf", image_column=image_column, text_column=text_column, image_root=image_root,
            check_files=False)))


def load_training_data(path: str | os.PathLike, image_column: str = "image", text_column: str = "text",
                       format: str | None = None, split: str | None = None, check_files: bool = False) -> PairDataset:
    """Training examples from any ``slq_hf.data`` format (None: guessed from the path as ``slq-hf eval`` does; a
    folder is a ``datasets`` folder read with ``image_column``/``text_column``); ``split`` None keeps every line.
    ``check_files``: a missing image file is an error naming its line now (else the example is skipped when used)."""
    hf = format == "hf" or (format in (None, "auto") and Path(path).is_dir())
    options = {"image_column": image_column, "text_column": text_column} if hf else {}
    return PairDataset(examples_from_records(read_records(path, format, split, check_files=check_files, **options)))
