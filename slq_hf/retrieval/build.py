"""``build_index``: corpus -> shards -> FAISS index, resumable and torchrun-aware.

INDEX_DIR layout::

    manifest.json        model + data fingerprints, settings, counts (see manifest.py)
    shards/              shard-00000.safetensors / .parquet / .bad.json ... (see shards.py)
    bad_items.jsonl      every skipped item: position, id, where, image, reason
    index.faiss          the FAISS index over all embedded rows, in shard order
    .replaced/           during an --overwrite build only: the build it replaces, put back if the new one fails
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..set_aside import put_back, set_aside
from . import faiss_index as fi
from .corpus import Corpus, CorpusItem, printable, read_corpus
from .distributed import distributed_context
from .encode import encode_corpus, shard_ranges
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    IndexMismatchError,
    data_fingerprint,
    describe_model_difference,
    model_fingerprint,
    read_manifest,
    using_query_set,
    write_manifest,
)
from .shards import SHARDS, ShardVectors, read_bad

INDEX_FILE = "index.faiss"
BAD_ITEMS = "bad_items.jsonl"
DEFAULT_SHARD_SIZE = 10_000


# Files one build writes; an --overwrite build moves its predecessor's into REPLACED and deletes them only once the
# new index is complete, so a failed or interrupted rebuild never costs the index that was there.
_BUILD_FILES = (SHARDS, INDEX_FILE, BAD_ITEMS, MANIFEST)
REPLACED = ".replaced"
# Manifest fields describing a finished build; a re-run keeps them until it finishes, so the index stays loadable.
_FINISHED_FIELDS = ("index", "num_vectors", "bad_items")


def _read_existing(index_dir: Path, overwrite: bool) -> dict | None:
    """The folder's manifest; with ``overwrite`` an unreadable one is simply replaced (its error says to do that)."""
    if not index_dir.exists():
        return None
    try:
        return read_manifest(index_dir)
    except ValueError:
        if overwrite:
            return None
        raise


def _check_or_start(index_dir: Path, manifest: dict, overwrite: bool) -> bool:
    """Refuse a folder built from another model/data (unless ``overwrite``: then set its build aside); write the
    manifest. Returns True when an earlier build waits in ``REPLACED`` (:func:`slq_hf.set_aside.set_aside`)."""
    existing = _read_existing(index_dir, overwrite)
    if existing is None and index_dir.exists() and any(index_dir.iterdir()) and not overwrite:
        if not (index_dir / SHARDS).exists():
            raise IndexMismatchError(f"{index_dir} exists, is not empty and is not an slq_hf index; choose another "
                                     "--out or pass --overwrite to replace its contents.")
    if existing is not None and not overwrite:
        problems = []
        if existing["model"]["fingerprint"] != manifest["model"]["fingerprint"]:
            problems.append(f"the model differs ({describe_model_difference(existing['model'], manifest['model'])})")
        if existing["data"]["fingerprint"] != manifest["data"]["fingerprint"]:
            problems.append(f"the data differs (it was {existing['data']['num_items']} items from "
                            f"{existing['data']['source']}; now {manifest['data']['num_items']} items from "
                            f"{manifest['data']['source']}, or files changed since)")
        if existing["shard_size"] != manifest["shard_size"]:
            problems.append(f"shard size {manifest['shard_size']} differs from the {existing['shard_size']} it was "
                            "started with")
        if problems:
            raise IndexMismatchError(f"{index_dir} holds an index built from something else: "
                                     f"{'; '.join(problems)}. Its shards are never mixed with new ones: pass "
                                     "--overwrite (overwrite=True) to start over, or choose another --out.")
        manifest.update({key: existing[key] for key in _FINISHED_FIELDS if key in existing})
    aside = (set_aside(_build_entries(index_dir), index_dir / REPLACED) if overwrite and index_dir.exists()
             else (index_dir / REPLACED).is_dir())
    try:
        (index_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        for stale in (index_dir / SHARDS).glob(".*.tmp-*"):  # a killed run's half-written files
            stale.unlink(missing_ok=True)
        write_manifest(index_dir, manifest)
    except BaseException:
        if aside:
            put_back(_build_entries(index_dir), index_dir / REPLACED)
        raise
    return aside


def _build_entries(index_dir: Path) -> list[Path]:
    """One build's files in ``index_dir`` (and the temporary files a failed index or bad-items write may leave)."""
    names = (*_BUILD_FILES, f".{INDEX_FILE}.tmp", f".{BAD_ITEMS}.tmp")
    return [index_dir / name for name in names if os.path.lexists(index_dir / name)]


def _collect_bad(index_dir: Path, num_shards: int) -> int:
    bad = [record for n in range(num_shards) for record in read_bad(index_dir, n)]
    tmp = index_dir / f".{BAD_ITEMS}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        for record in bad:
            handle.write(json.dumps(record, default=str) + "\n")
    os.replace(tmp, index_dir / BAD_ITEMS)
    return len(bad)


def _training_sample(vectors: ShardVectors, count: int) -> np.ndarray:
    rows = np.linspace(0, len(vectors) - 1, num=min(count, len(vectors))).astype(np.int64)
    return vectors.take(np.unique(rows))


def build_faiss(index_dir: Path, num_shards: int, factory: str, precision: str, show_progress_bar: bool | None = None,
                before_replace: Callable[[], None] | None = None):
    """Build and save the FAISS index over the shards' embeddings (streamed shard by shard). Returns the index.

    ``before_replace`` runs once the new index is written to a temporary file, just before it replaces the old one
    (the manifest is marked "index not ready" there, so the old manifest never describes the new file)."""
    from tqdm.auto import tqdm

    faiss = fi.faiss()
    vectors = ShardVectors(index_dir, num_shards)
    if len(vectors) == 0:
        raise ValueError(f"{index_dir}: no item could be embedded (see {BAD_ITEMS}); nothing to index.")
    index = fi.new_index(vectors.dim, factory, precision)
    needed = fi.training_rows(index)
    if needed:
        fi.train(index, _training_sample(vectors, needed), precision)
    disable = None if show_progress_bar is None else not show_progress_bar
    for part in tqdm(vectors.iter_shards(), total=num_shards, desc="index", unit="shard", disable=disable):
        if len(part):
            fi.add(index, part, precision)
    tmp = index_dir / f".{INDEX_FILE}.tmp"
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, str(tmp))
    else:
        faiss.write_index(index, str(tmp))
    if before_replace is not None:
        before_replace()
    os.replace(tmp, index_dir / INDEX_FILE)
    return index


def build_index(
    model: Any,
    data: str | os.PathLike | Corpus,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    split: str | None = None,
    batch_size: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    precision: str = "float32",
    faiss_factory: str | None = None,
    query_set: str | None = None,
    overwrite: bool = False,
    strict: bool = False,
    show_progress_bar: bool | None = None,
    model_source: str | None = None,
    **read_kwargs,
) -> dict:
    """Encode ``data`` with ``model`` into shards under ``out`` and build its FAISS index.

    Safe to re-run: finished shards are kept (a finished build only re-checks fingerprints), a changed model or
    data is refused unless ``overwrite`` (which keeps the earlier build aside until the new one is complete, and
    puts it back if the new build fails). Under ``torchrun`` every rank encodes its share of the shards; rank 0
    then builds the index. Changing only ``precision``/``faiss_factory`` rebuilds the index from the shards.

    Args:
        model: an ``SLQModel`` (anything with ``encode``, ``config`` and the query-set API).
        data: a path (see :func:`read_corpus`) or a :class:`Corpus`.
        precision: float32 | float16 | int8 | ubinary (how FAISS stores the vectors; see faiss_index.py).
        faiss_factory: FAISS index-factory string; default by corpus size (:func:`faiss_index.default_factory`).
        query_set: embed the corpus with this query set (default: the model's active one).
        model_source: the model's folder or Hub id, recorded so `slq-hf search` can load it by default.

    Returns:
        the manifest (dict) with "run": {"skipped_shards", "encoded_shards", "bad_items", "seconds", ...}.
    """
    started = time.perf_counter()
    fi.check_precision(precision)
    if faiss_factory is not None:  # a bad factory fails now, not after hours of encoding (or after --overwrite)
        fi.new_index(int(model.config.embedding_dim), faiss_factory, precision)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer.")
    corpus = data if isinstance(data, Corpus) else read_corpus(data, format, split=split, **read_kwargs)
    check_unique_ids(corpus)
    ranges = shard_ranges(len(corpus), shard_size)
    index_dir = Path(out)
    with distributed_context() as context, using_query_set(model, query_set):
        keys = [item.key() for item in corpus.items]
        fingerprint = model_fingerprint(model)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": {**fingerprint, "source": _source(model, model_source),
                      "embedding_dim": int(model.config.embedding_dim)},
            "data": {"source": corpus.source, "format": corpus.format, "root": corpus.root, "split": split,
                     "fingerprint": data_fingerprint(keys), "num_items": len(corpus)},
            "shard_size": shard_size,
            "num_shards": len(ranges),
            "index": None,
        }
        error, aside = None, False
        if context.is_main:
            try:
                aside = _check_or_start(index_dir, manifest, overwrite)
            except (IndexMismatchError, ValueError, OSError) as err:
                error = err
        error = context.broadcast(None if error is None else str(error)) if context.world_size > 1 else error
        if error is not None:
            raise error if isinstance(error, Exception) else IndexMismatchError(error)
        context.barrier()
        try:
            summary = encode_corpus(model, corpus, index_dir, shard_size=shard_size, batch_size=batch_size,
                                    strict=strict, context=context, item_keys=keys,
                                    show_progress_bar=show_progress_bar, model_id=fingerprint["fingerprint"])
            context.barrier()
            if not context.is_main:
                return manifest
            manifest = _finish(index_dir, manifest, len(ranges), precision, faiss_factory, show_progress_bar,
                               shards_changed=summary.encoded > 0)
        except BaseException:  # Ctrl-C too: the build that was there before --overwrite comes back
            if aside:
                put_back(_build_entries(index_dir), index_dir / REPLACED)
            raise
        if aside:
            shutil.rmtree(index_dir / REPLACED)
    manifest["run"] = {"skipped_shards": summary.skipped, "encoded_shards": summary.encoded,
                       "bad_items": manifest["bad_items"], "seconds": time.perf_counter() - started,
                       "world_size": context.world_size}
    return manifest


def check_unique_ids(corpus: Corpus) -> None:
    """Search results name items by id: two items with one id would be told apart by nothing. Raise naming both."""
    seen: dict[str, int] = {}
    for position, item in enumerate(corpus.items):
        first = seen.setdefault(item.id, position)
        if first != position:
            raise ValueError(f"{_location(item, position)}: id {printable(item.id)!r} is also the id of "
                             f"{_location(corpus.items[first], first)}; ids must be unique within the corpus (give "
                             "each item its own id).")


def _location(item: CorpusItem, position: int) -> str:
    return printable(item.where) if item.where else f"corpus item {position}"


def _source(model: Any, given: str | os.PathLike | None) -> str | None:
    """Where the model can be loaded from again (`slq-hf search` defaults to it): a folder as an absolute path."""
    source = given or getattr(model.config, "_name_or_path", None) or None
    if source is not None and Path(source).is_dir():
        return str(Path(source).resolve())
    return None if source is None else str(source)


def _finish(index_dir: Path, manifest: dict, num_shards: int, precision: str, factory: str | None,
            show_progress_bar: bool | None, shards_changed: bool) -> dict:
    bad = _collect_bad(index_dir, num_shards)
    vectors = ShardVectors(index_dir, num_shards)
    factory = factory or fi.default_factory(len(vectors), vectors.dim)
    wanted = {"factory": factory, "precision": precision, "num_vectors": len(vectors)}
    previous = manifest.get("index") or {}
    reuse = (not shards_changed and (index_dir / INDEX_FILE).is_file()
             and all(previous.get(k) == v for k, v in wanted.items()))
    if not reuse:
        # Until the new index file is in place, the manifest says "not ready" rather than describing the old one.
        pending = {k: v for k, v in manifest.items() if k not in _FINISHED_FIELDS}
        build_faiss(index_dir, num_shards, factory, precision, show_progress_bar,
                    before_replace=lambda: write_manifest(index_dir, {**pending, "index": None}))
    elif show_progress_bar is not False:
        print(f"Index {INDEX_FILE} ({factory}, {precision}) is up to date; not rebuilt.", file=sys.stderr)
    manifest["index"] = {**wanted, "resolved_factory": fi.resolve_factory(factory, precision),
                         "exact_scores": fi.is_exact_storage(factory, precision)}
    manifest["bad_items"] = bad
    manifest["num_vectors"] = len(vectors)
    write_manifest(index_dir, manifest)
    return manifest
