"""Retrieval datasets for evaluation (:class:`RetrievalDataset`), read by :func:`load_retrieval_dataset` from any
format of ``slq_hf.data`` (jsonl, karpathy, karr, hf)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import FORMATS, DataFormatError, DatasetImage, ImageSource, Record, detect_format, image_key, read_records

__all__ = ["FORMATS", "ComposedQuery", "DataFormatError", "DatasetImage", "ImageSource", "RetrievalDataset",
           "detect_format", "from_records", "load_retrieval_dataset", "read_hf", "read_jsonl", "read_karpathy",
           "read_karr"]


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
        split: the split of the data file these records come from; None when the file has no splits (then no report
            or model card may claim one).
    """

    images: list[ImageSource]
    texts: list[str]
    text_to_image: list[int]
    composed: list[ComposedQuery] = field(default_factory=list)
    name: str = "dataset"
    image_ids: list[str] | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        # A str here is an image file's path (as in from_pairs(["a.jpg", ...])); as a Path it stays one, where the
        # encoders read every str as a text and would embed the file's name.
        self.images = [Path(image) if isinstance(image, str) else image for image in self.images]
        self.texts, self.text_to_image = list(self.texts), list(self.text_to_image)
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


def from_records(records: Iterable[Record], name: str, split: str | None = None) -> RetrievalDataset:
    """Images merged by identity (resolved file or content key), captions and composed queries, in file order."""
    index: dict[Any, int] = {}
    images, ids, texts, owners, composed = [], [], [], [], []

    def add(item) -> int:
        key = image_key(item.image)
        if key not in index:
            index[key] = len(images)
            images.append(item.image)
            ids.append(item.name or str(len(ids)))
        return index[key]

    for record in records:
        query, positives = record.query, record.positives
        image_only = [p.image is not None and p.text is None for p in positives]
        if query.image is not None and query.text is None and not any(p.image is not None for p in positives):
            owner = add(query)  # an image and its captions
            texts.extend(p.text for p in positives)
            owners.extend([owner] * len(positives))
        elif query.image is None and all(image_only):
            texts.extend([query.text] * len(positives))  # a text query and the image it finds
            owners.extend(add(p) for p in positives)
        elif query.image is not None and query.text is not None and all(image_only):
            reference = add(query)
            for positive in positives:
                target = add(positive)
                if reference == target:
                    raise DataFormatError(record.source, "reference and target are the same image.")
                composed.append(ComposedQuery(reference, query.text, target))
        else:
            raise DataFormatError(record.source, "retrieval evaluation needs an image with captions, a text with an "
                                  "image, or a composed (image + text -> image) query; this record is none of them.")
    return RetrievalDataset(images, texts, owners, composed, name=name, image_ids=ids, split=split)


def load_retrieval_dataset(path: str | os.PathLike | Any, format: str | None = None, split: str | None = "test",
                           *, image_root: str | os.PathLike | None = None, text_field: str | None = None,
                           image_column: str | None = None, text_column: str | None = None,
                           max_captions: int | None = None, check_files: bool | None = None) -> RetrievalDataset:
    """Read any ``slq_hf.data`` format (``format`` None/"auto" guesses it) into a :class:`RetrievalDataset`.

    ``split`` "all"/None keeps every record. Options that a format does not take raise a ValueError naming them.
    """
    format = detect_format(path) if format in (None, "auto") else format
    split = None if split == "all" else split
    records = read_records(path, format, split, image_root=image_root, text_field=text_field,
                           image_column=image_column, text_column=text_column, max_captions=max_captions,
                           check_files=check_files)
    label = Path(path).stem if isinstance(path, (str, os.PathLike)) else str(
        getattr(getattr(path, "info", None), "dataset_name", None) or "dataset")
    # Only name a split the data actually has: a file without split fields is not "the test split".
    has_split = split is not None and (format == "karpathy" or any(r.split for r in records))
    name = f"{label}:{split}" if has_split else label
    return from_records(records, f"{name}:{text_field or 'knowledge'}" if format == "karr" else name,
                        split if has_split else None)


# One reader per format, as before the shared table existed; options are those of the format's reader.
def read_karpathy(path: Any, split: str | None = "test", **options: Any) -> RetrievalDataset:
    return load_retrieval_dataset(path, "karpathy", split, **options)


def read_jsonl(path: Any, split: str | None = "test", **options: Any) -> RetrievalDataset:
    return load_retrieval_dataset(path, "jsonl", split, **options)


def read_karr(path: Any, split: str | None = "test", **options: Any) -> RetrievalDataset:
    return load_retrieval_dataset(path, "karr", split, **options)


def read_hf(source: Any, split: str | None = "test", **options: Any) -> RetrievalDataset:
    return load_retrieval_dataset(source, "hf", split, **options)
