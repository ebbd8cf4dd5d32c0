"""Sharded, resumable, distributed corpus encoding (the clip-retrieval pattern, on SLQ's ``encode``).

Shard ``n`` holds corpus items ``[n * shard_size, (n + 1) * shard_size)``. A shard whose files exist with the
digest of exactly its items is finished and skipped; the others are split round-robin over the torchrun ranks.
Every shard is embedded the same way whichever rank (or how many ranks) run it, so a distributed build produces
the same files as one process.

Bad items (unreadable or missing images, empty texts, unusable data lines) are skipped and listed with their
location and reason; ``strict=True`` raises on the first one instead.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import Corpus, CorpusItem
from .distributed import Context
from .shards import finished_digest, read_bad, write_shard

# Items handed to model.encode at once: large enough to length-sort into full batches, small enough for a
# responsive progress bar.
_CHUNK_BATCHES = 4


class BadItemError(ValueError):
    """``strict`` encoding met an item it cannot embed."""


@dataclass
class EncodeSummary:
    """What one encode run did. ``skipped`` shards were already finished; ``bad`` counts this run's skips."""

    num_shards: int
    skipped: int
    encoded: int
    items: int
    seconds: float


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r} is invalid; expected a positive integer.")
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shard_digest(keys: list[str]) -> str:
    return hashlib.sha256("|".join(keys).encode()).hexdigest()


def _load(item: CorpusItem, budget: Any) -> tuple[Any, str | None]:
    """(model input, None) or (None, reason the item cannot be embedded)."""
    from ..processing import SLQInputError, load_image

    if item.error:
        return None, item.error
    if item.text is not None and not item.text.strip():
        return None, "empty text"
    image = None
    if item.image is not None:
        try:
            # A datasets row (DatasetImage) opens through its own loader; file paths go straight to load_image.
            source = item.image if isinstance(item.image, str) else item.image.load()
            image = load_image(source, budget=budget)
        except (SLQInputError, OSError, ValueError, SyntaxError, EOFError) as err:
            return None, str(err)
    if image is None:
        return {"text": item.text}, None
    return (image if item.text is None else {"image": image, "text": item.text}), None


def _bad_record(item: CorpusItem, position: int, reason: str) -> dict:
    return {"position": position, "id": item.id, "where": item.where, "image": item.image_ref, "reason": reason}


def _encode_chunk(model: Any, inputs: list, batch_size: int, positions: list[int],
                  corpus: Corpus) -> tuple[list[np.ndarray | None], dict[int, str]]:
    """Embed ``inputs``; if the batch fails, retry item by item so only the culprits are dropped."""
    try:
        out = model.encode(inputs, batch_size=batch_size, show_progress_bar=False)
        return list(np.asarray(out, dtype=np.float32)), {}
    except (ValueError, OSError) as batch_error:
        if len(inputs) == 1:
            return [None], {positions[0]: f"the model cannot embed it: {batch_error}"}
    rows, failed = [], {}
    for value, position in zip(inputs, positions):
        row, bad = _encode_chunk(model, [value], 1, [position], corpus)
        rows.extend(row)
        failed.update(bad)
    return rows, failed


def encode_shard(model: Any, corpus: Corpus, items: range, batch_size: int, strict: bool,
                 progress: Any = None) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Embed the items at ``items`` (corpus positions). Returns (embeddings (n, D) float32, rows, bad records)."""
    from ..processing import image_budget

    budget = image_budget(model.processor) if getattr(model, "processor", None) is not None else None
    chunk = batch_size * _CHUNK_BATCHES
    embeddings, rows, bad = [], [], []
    positions = list(items)
    for start in range(0, len(positions), chunk):
        inputs, kept = [], []
        for position in positions[start : start + chunk]:
            item = corpus.items[position]
            value, reason = _load(item, budget)
            if reason is not None:
                if strict:
                    raise BadItemError(f"{item.where or item.id}: {reason} (strict mode stops on the first bad "
                                       "item; drop --strict to skip and list bad items instead).")
                bad.append(_bad_record(item, position, reason))
                continue
            inputs.append(value)
            kept.append(position)
        if inputs:
            vectors, failed = _encode_chunk(model, inputs, batch_size, kept, corpus)
            for position, vector in zip(kept, vectors):
                item = corpus.items[position]
                if position in failed:
                    if strict:
                        raise BadItemError(f"{item.where or item.id}: {failed[position]}")
                    bad.append(_bad_record(item, position, failed[position]))
                    continue
                embeddings.append(vector)
                rows.append({"position": position, "id": item.id, "image": item.image_ref, "text": item.text,
                             "metadata": item.metadata})
        if progress is not None:
            progress.update(len(positions[start : start + chunk]))
    dim = int(model.config.embedding_dim)
    matrix = np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, dim), dtype=np.float32)
    return matrix, rows, bad


def pending_shards(index_dir: str | Path, digests: list[str]) -> list[int]:
    """Shards not yet finished with exactly these items."""
    return [n for n, digest in enumerate(digests) if finished_digest(index_dir, n) != digest]


def _plan(index_dir: str | Path, digests: list[str], strict: bool) -> tuple[list[int], dict | None]:
    """(pending shards, with ``strict`` the first bad item a finished shard lists, else None): a shard an earlier
    run without --strict finished may hold skipped items, which a strict build must not pass over."""
    pending = pending_shards(index_dir, digests)
    done = sorted(set(range(len(digests))) - set(pending)) if strict else []
    return pending, next((record for n in done for record in read_bad(index_dir, n)), None)


def encode_corpus(model: Any, corpus: Corpus, index_dir: str | Path, *, shard_size: int, batch_size: int = 16,
                  strict: bool = False, context: Context | None = None, item_keys: list[str] | None = None,
                  show_progress_bar: bool | None = None, model_id: str = "") -> EncodeSummary:
    """Encode every unfinished shard of ``corpus`` into ``index_dir/shards`` (this rank's share of them).

    Args:
        item_keys: :meth:`CorpusItem.key` of every item (computed here when None).
        context: the distributed context (one process when None).
        model_id: the model's fingerprint, part of every shard's digest: a shard embedded by another model is
            never taken for finished, even if the manifest was lost.

    Returns:
        an :class:`EncodeSummary` (counts over all ranks for shards, this rank's for items).
    """
    from tqdm.auto import tqdm

    context = context or Context()
    started = time.perf_counter()
    keys = item_keys if item_keys is not None else [item.key() for item in corpus.items]
    ranges = shard_ranges(len(corpus), shard_size)
    digests = [shard_digest([model_id, *keys[r.start : r.stop]]) for r in ranges]
    # Rank 0 decides which shards are left, so ranks never disagree about a shard finishing mid-scan.
    pending, bad = context.broadcast(_plan(index_dir, digests, strict) if context.is_main else None)
    if bad is not None:
        raise BadItemError(f"{bad['where'] or bad['id']}: {bad['reason']} (skipped by an earlier run without "
                           "--strict; strict mode stops on the first bad item: fix or remove it and rebuild with "
                           "--overwrite, or drop --strict).")
    mine = pending[context.rank :: context.world_size]
    skipped = len(ranges) - len(pending)
    if context.is_main and skipped:
        print(f"Resuming: {skipped} of {len(ranges)} shards already finished, skipped; {len(pending)} to encode.",
              file=sys.stderr)
    total = sum(len(ranges[n]) for n in mine)
    desc = "encode" if context.world_size == 1 else f"encode (rank 0 of {context.world_size}, its share)"
    disable = not context.is_main or (None if show_progress_bar is None else not show_progress_bar)
    with tqdm(total=total, desc=desc, unit="item", disable=disable, dynamic_ncols=True) as bar:
        for number in mine:
            embeddings, rows, bad = encode_shard(model, corpus, ranges[number], batch_size, strict, bar)
            write_shard(index_dir, number, embeddings, rows, bad, digests[number])
    return EncodeSummary(num_shards=len(ranges), skipped=skipped, encoded=len(pending), items=total,
                         seconds=time.perf_counter() - started)
