"""SLQDataCollator: training examples -> one pair batch for ``SLQModel.forward``.

Batch-key convention (what ``SLQModel.forward`` reads): the plain processor keys (``input_ids``, ``attention_mask``,
``pixel_values``, ...) hold the QUERY side of every pair; the same keys prefixed ``positive_`` hold the positive
side, row-aligned; keys prefixed ``negative_`` hold the hard negatives of the examples that have one (M rows, any
M). ``{"image", "text"}`` examples put the image on the query side and the text on the positive side; the loss is
symmetric, so the choice only names the two directions of the reported accuracy.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

from ..modeling.image_files import open_image
from ..modeling.processing_slq import ImageBudget, SLQInputError, SLQItem, collate, image_budget, to_item

logger = logging.getLogger(__name__)

# Optional key of an example naming where it came from (e.g. "pairs.jsonl:17"); used in warnings and errors only.
SOURCE_KEY = "_source"
# Batch key carrying the descriptions of skipped examples to SLQTrainer (set only when report_skips_in_batch=True).
SKIPPED_KEY = "slq_skipped_examples"
# Batch key (set with SKIPPED_KEY) of (examples given, their positions that were skipped): under torchrun, SLQTrainer's
# evaluation puts an empty row in each skipped example's place, so every rank's predictions keep their rows.
ROWS_KEY = "slq_example_rows"
# Batch key of the list of micro-batches (GradCache); each is a complete pair batch of consecutive examples.
MICRO_BATCHES_KEY = "slq_micro_batches"
PAIR_KEYS = ("query", "positive", "negative")
IMAGE_TEXT_KEYS = ("image", "text")


@dataclass
class SkippedExample:
    """An example the collator left out of its batch, and why."""

    index: int
    source: str | None
    reason: str

    def __str__(self) -> str:
        where = f"example {self.index} of its batch" + (f" ({self.source})" if self.source else "")
        return f"{where}: {self.reason}"


def _describe(example: Any, index: int | None) -> str:
    source = example.get(SOURCE_KEY) if isinstance(example, dict) else None
    where = "Training example" if index is None else f"Training example {index} of the batch"
    return where + (f" ({source})" if source else "")


def example_roles(example: Any, index: int | None = None) -> dict[str, Any]:
    """Check an example's keys and return its items by role: {"query", "positive"[, "negative"]}.

    Accepted examples: ``{"image": PIL|path, "text": str}`` (image = query, text = positive) or
    ``{"query": item, "positive": item, "negative"?: item}``, where an item is a text, an image (PIL or path), an
    image+text dict ``{"image", "text"}`` or a decoded-later image ``{"bytes", "path"}`` (``datasets`` with
    ``decode=False``). An optional ``"_source"`` key names the example in messages.

    Raises:
        ValueError naming the example when its keys do not match either format. Problems with the VALUES (an
        unreadable image, an empty text) are found later, when the items are loaded.
    """
    where = _describe(example, index)
    if not isinstance(example, dict):
        raise ValueError(f"{where} is a {type(example).__name__}; expected a dict such as {{'image': ..., 'text': "
                         "...}} or {'query': ..., 'positive': ...}.")
    keys = set(example) - {SOURCE_KEY}
    if not keys:
        raise ValueError(f"{where} has no keys. The Trainer drops dataset columns that SLQModel.forward does not "
                         "name: pass TrainingArguments(remove_unused_columns=False), or use "
                         "slq_hf.training.SLQTrainer, which keeps them.")
    if "query" in keys or "positive" in keys:
        unknown = sorted(keys - set(PAIR_KEYS))
        if unknown or "query" not in keys or "positive" not in keys:
            problem = f"unexpected keys {unknown}" if unknown else f"only {sorted(keys)}"
            raise ValueError(f"{where} has {problem}; a pair example needs 'query' and 'positive' and may have "
                             "'negative' (a hard negative for the query).")
        return {role: example[role] for role in PAIR_KEYS if role in keys}
    unknown = sorted(keys - set(IMAGE_TEXT_KEYS))
    if unknown or keys != set(IMAGE_TEXT_KEYS):
        problem = f"unexpected keys {unknown}" if unknown else f"only {sorted(keys)}"
        raise ValueError(f"{where} has {problem}; expected {{'image': ..., 'text': ...}} or {{'query': ..., "
                         "'positive': ..., 'negative'?: ...}. Drop other dataset columns (dataset.select_columns) "
                         "or wrap the dataset with slq_hf.training.HFPairDataset.")
    # The "text" of an {"image", "text"} example is a text even when it reads like a file name ("IMG_0042.JPG").
    return {"query": {"image": example["image"]}, "positive": {"text": example["text"]}}


def _decode_image_record(value: Any) -> Any:
    """``datasets`` Image(decode=False) records {"bytes", "path"} -> PIL image or path; anything else unchanged."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and value:
        if value.get("bytes") is not None:
            # Header only (allowed formats, size), decoded later by to_item with the size limits and the budget.
            return open_image(io.BytesIO(value["bytes"]), f"file {value.get('path') or '<bytes>'!r}")
        if value.get("path"):
            return value["path"]
        raise SLQInputError("Image record has neither bytes nor a path.")
    return value


def load_item(value: Any, budget: ImageBudget | None = None) -> SLQItem:
    """Load one item (text, image, image+text, ``{"bytes", "path"}`` record) into an SLQItem; ``budget``
    (``image_budget(processor)``) shrinks huge images while they are decoded.

    Raises SLQInputError (a ValueError) for unreadable or missing images, empty texts, None and wrong types.
    """
    if isinstance(value, dict) and "image" in value:
        value = {**value, "image": _decode_image_record(value["image"])}
    else:
        value = _decode_image_record(value)
    if isinstance(value, bytes):
        raise SLQInputError("Got raw bytes; pass {'image': {'bytes': ...}} or a PIL image.")
    return to_item(value, budget=budget)


class SLQDataCollator:
    """Collate training examples into one SLQ pair batch (query side, ``positive_*`` side, ``negative_*`` side).

    Args:
        processor: the backbone's processor (``model.processor``); the chat template is applied to every item, as in
            ``SLQModel.encode``.
        strict: when False (default), an example whose items cannot be loaded (unreadable/missing image, empty text,
            None) is left out of its batch, counted in :attr:`skipped` and logged (the first ``max_warnings``), so
            one bad file does not end a training run; :class:`~slq_hf.training.SLQTrainer` reports the total at the
            end of training. When True, the first such example raises SLQInputError. Examples whose KEYS are wrong
            always raise ValueError: that is a format error of the whole dataset, not one corrupt example. An item
            the backbone's processor refuses (e.g. Qwen-VL: an image with an aspect ratio above 200) counts as
            unloadable too.
        max_warnings: how many skipped examples are logged individually.
        max_length: longest prompt in tokens (``model.max_prompt_length()``; SLQTrainer fills it in from the model
            when None). Longer user texts are truncated with a warning, keeping the chat template's generation
            prompt, exactly as ``SLQModel.encode`` does.
        micro_batch_size: GradCache (``SLQTrainer(micro_batch_size=...)`` sets it): the loaded examples are split
            into complete pair batches of at most this many examples, returned as a list under
            ``"slq_micro_batches"``; the contrastive batch is still the whole batch.

    Returns (``__call__``): a dict of tensors, e.g. for Qwen-VL ``input_ids`` (B, L), ``attention_mask`` (B, L),
    ``pixel_values`` (P, C), ``image_grid_thw`` (B_img, 3), ``mm_token_type_ids`` (B, L) and the same keys with the
    ``positive_`` (B rows) and ``negative_`` (M rows) prefixes. When every example of a batch is unloadable and
    ``strict`` is False, SLQTrainer gets a batch without inputs (only the skip descriptions) and skips the step;
    without SLQTrainer that raises SLQInputError.
    """

    def __init__(self, processor: Any, strict: bool = False, max_warnings: int = 10, max_length: int | None = None,
                 micro_batch_size: int | None = None):
        if processor is None:
            raise ValueError("SLQDataCollator: processor is None; pass model.processor (the backbone's processor).")
        if isinstance(max_warnings, bool) or not isinstance(max_warnings, int) or max_warnings < 0:
            raise ValueError(f"SLQDataCollator: max_warnings={max_warnings!r} is invalid; expected an integer >= 0.")
        self.processor = processor
        self.strict = strict
        self.max_warnings = max_warnings
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size  # checked by the property's setter
        # Huge images are shrunk to the processor's budget while they are decoded (JPEG: at reduced scale).
        self.image_budget = image_budget(processor)
        self.skipped: list[SkippedExample] = []
        # SLQTrainer sets this: with dataloader workers the collator runs in other processes, so the skipped
        # examples travel with the batch instead of living in this object.
        self.report_skips_in_batch = False

    @property
    def micro_batch_size(self) -> int | None:
        """GradCache micro-batch size (None: one pair batch)."""
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        # A property, so SLQTrainer(micro_batch_size=...) setting it later is checked too: 0 or a negative size
        # would otherwise fail inside the dataloader (range() step 0) or give a step with no micro-batch at all.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"SLQDataCollator: micro_batch_size={value!r} is invalid; expected a positive integer "
                             "or None.")
        self._micro_batch_size = value

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        if not isinstance(examples, (list, tuple)) or not examples:
            raise ValueError(f"SLQDataCollator expects a non-empty list of examples, got {examples!r:.80}.")
        loaded: dict[int, dict[str, SLQItem]] = {}  # example index -> items by role
        skipped: list[SkippedExample] = []
        for index, example in enumerate(examples):
            roles = example_roles(example, index)
            try:
                loaded[index] = {role: self._load(role, value) for role, value in roles.items()}
            except SLQInputError as err:
                self._skip(examples, index, str(err), skipped, err)
        try:
            batch = self._collate_all(list(loaded.values())) if loaded else None
        except SLQInputError:
            # The processor refused an item. Find the example(s) it cannot handle alone (rare: only after a
            # failure), skip them like unreadable files and collate the rest.
            refused = {index: reason for index, pair in loaded.items() if (reason := self._unprocessable(pair))}
            if not refused:
                raise
            for index, reason in refused.items():
                self._skip(examples, index, reason, skipped)
                del loaded[index]
            batch = self._collate_all(list(loaded.values())) if loaded else None
        self._record(skipped)
        report = {SKIPPED_KEY: [str(s) for s in skipped], ROWS_KEY: (len(examples), [s.index for s in skipped])}
        if batch is None and self.report_skips_in_batch:
            return report  # SLQTrainer skips the step and counts the examples
        if batch is None:
            raise SLQInputError(f"All {len(examples)} examples of this batch could not be loaded: "
                                f"{'; '.join(map(str, skipped[:3]))}. Check the data paths and files.")
        if self.report_skips_in_batch:
            batch.update(report)
        return batch

    def _collate_all(self, loaded: list[dict[str, SLQItem]]) -> dict[str, Any]:
        """One pair batch, or (GradCache) {"slq_micro_batches": [pair batch, ...]} in example order."""
        if self.micro_batch_size is None:
            return self._collate(loaded)
        size = self.micro_batch_size
        return {MICRO_BATCHES_KEY: [self._collate(loaded[start : start + size])
                                    for start in range(0, len(loaded), size)]}

    def _collate(self, loaded: list[dict[str, SLQItem]]) -> dict[str, Any]:
        batch = dict(collate(self.processor, [pair["query"] for pair in loaded], max_length=self.max_length))
        positives = collate(self.processor, [pair["positive"] for pair in loaded], max_length=self.max_length)
        batch.update({f"positive_{k}": v for k, v in positives.items()})
        negatives = [pair["negative"] for pair in loaded if "negative" in pair]
        if negatives:
            batch.update({f"negative_{k}": v for k, v in
                          collate(self.processor, negatives, max_length=self.max_length).items()})
        return batch

    def _unprocessable(self, pair: dict[str, SLQItem]) -> str | None:
        """Why the processor refuses one of this example's items on its own, or None."""
        for role, item in pair.items():
            try:
                collate(self.processor, [item], max_length=self.max_length)
            except SLQInputError as err:
                return f"{role!r}: {err}"
        return None

    def _skip(self, examples: list[dict], index: int, reason: str, skipped: list[SkippedExample],
              cause: Exception | None = None) -> None:
        if self.strict:
            raise SLQInputError(f"{_describe(examples[index], index)}: {reason} (strict=True: fix or remove the "
                                "example, or train with strict=False to skip such examples).") from cause
        skipped.append(SkippedExample(index, examples[index].get(SOURCE_KEY), reason))

    def _load(self, role: str, value: Any) -> SLQItem:
        try:
            return load_item(value, budget=self.image_budget)
        except SLQInputError as err:
            raise SLQInputError(f"{role!r}: {err}") from err

    def _record(self, skipped: list[SkippedExample]) -> None:
        for item in skipped:
            self.skipped.append(item)
            count = len(self.skipped)
            if count <= self.max_warnings:
                more = " (further skips are counted, not logged)" if count == self.max_warnings else ""
                logger.warning("Skipped %s%s", item, more)

    @property
    def num_skipped(self) -> int:
        """How many examples this collator object skipped (in this process)."""
        return len(self.skipped)

