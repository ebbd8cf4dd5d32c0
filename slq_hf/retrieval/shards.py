"""Shards on disk: ``shards/shard-00000.safetensors`` (float32 embeddings) + ``shards/shard-00000.parquet`` (rows).

Each shard covers ``shard_size`` consecutive corpus items. Its Parquet table has one row per embedded item:
``position`` (index in the corpus), ``id``, ``image`` (as the data names it), ``text`` and ``metadata`` (a JSON
string: items may carry different fields). The safetensors file holds ``embeddings`` (n, D) float32 and is written
last, through a rename: its presence marks a finished shard, so a crash mid-shard leaves nothing that looks done.
Its metadata records the digest of the shard's items and of the model, so a shard is reused only for exactly the
same items embedded by the same model.
Bad items of the shard are listed in ``shard-00000.bad.json``.

The Parquet files load with ``datasets.load_dataset("parquet", data_files="INDEX_DIR/shards/*.parquet")``; the
embeddings are memory-mapped (safetensors' raw little-endian layout), so rescoring reads only the rows it needs.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..modeling.checkpoint import atomic_write

SHARDS = "shards"
COLUMNS = ("position", "id", "image", "text", "metadata")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def shard_paths(index_dir: str | os.PathLike, number: int) -> dict[str, Path]:
    base = Path(index_dir) / SHARDS / shard_name(number)
    return {"embeddings": base.with_suffix(".safetensors"), "rows": base.with_suffix(".parquet"),
            "bad": base.with_suffix(".bad.json")}


def write_shard(index_dir: str | os.PathLike, number: int, embeddings: np.ndarray, rows: list[dict],
                bad: list[dict], items_digest: str) -> None:
    """Write one finished shard: rows and bad list first, the embeddings (the "done" marker) last."""
    import pyarrow as pa
    from safetensors.numpy import save_file

    paths = shard_paths(index_dir, number)
    paths["embeddings"].parent.mkdir(parents=True, exist_ok=True)
    if len(rows) != len(embeddings):
        raise RuntimeError(f"shard {number}: {len(rows)} rows but {len(embeddings)} embeddings")
    table = pa.table({
        "position": pa.array([r["position"] for r in rows], pa.int64()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "metadata": pa.array([json.dumps(r["metadata"], sort_keys=True, default=str) for r in rows], pa.string()),
    })
    atomic_write(paths["bad"], lambda p: p.write_text(json.dumps(bad, indent=1, default=str), encoding="utf-8"))
    atomic_write(paths["rows"], lambda p: _write_rows(table, p))
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise RuntimeError(f"shard {number}: embeddings must be (n, D), got shape {array.shape}")
    atomic_write(paths["embeddings"], lambda p: save_file({"embeddings": array}, str(p),
                                                     metadata={"items_digest": items_digest,
                                                               "count": str(len(rows))}))


def _write_rows(table, path: Path) -> None:
    """Write ``table`` as Parquet; a shard of only bad items gets no row group at all: `datasets` reads a file in
    batches of its first row group's size, and a 0-row group makes that 0, which pyarrow refuses."""
    import pyarrow.parquet as pq

    if table.num_rows:
        pq.write_table(table, str(path))
    else:
        pq.ParquetWriter(str(path), table.schema).close()


def _header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > path.stat().st_size - 8:  # a damaged file: reading that many bytes would not fit in memory
            raise ValueError(f"{path}: the safetensors header claims {length} bytes, more than the file holds.")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object.")
    return header, 8 + length


def finished_digest(index_dir: str | os.PathLike, number: int) -> str | None:
    """The items digest of finished shard ``number``, or None when it is missing/incomplete/unreadable."""
    paths = shard_paths(index_dir, number)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        header, _ = _header(paths["embeddings"])
    except (OSError, ValueError, struct.error):
        return None
    return (header.get("__metadata__") or {}).get("items_digest")


def open_embeddings(path: str | os.PathLike) -> np.ndarray:
    """The (n, D) float32 ``embeddings`` tensor of a shard, memory-mapped read-only."""
    path = Path(path)
    header, data_start = _header(path)
    entry = header["embeddings"]
    if entry["dtype"] != "F32" or len(entry["shape"]) != 2:
        raise ValueError(f"{path}: expected a 2-d F32 'embeddings' tensor, got {entry['dtype']} {entry['shape']}.")
    rows, dim = entry["shape"]
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    begin, _ = entry["data_offsets"]
    return np.memmap(path, dtype="<f4", mode="r", offset=data_start + begin, shape=(rows, dim))


def read_bad(index_dir: str | os.PathLike, number: int) -> list[dict]:
    return json.loads(shard_paths(index_dir, number)["bad"].read_text(encoding="utf-8"))


class ShardVectors:
    """All shards' embeddings as one virtual (N, D) float32 matrix, rows in shard order, read through memmaps."""

    def __init__(self, index_dir: str | os.PathLike, num_shards: int):
        self.parts = [open_embeddings(shard_paths(index_dir, n)["embeddings"]) for n in range(num_shards)]
        counts = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.dim = next((p.shape[1] for p in self.parts if len(p)), 0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(n,) int64 global rows -> (n, D) float32 (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for number in np.unique(part):
            mask = part == number
            local = rows[mask] - self.offsets[number]
            order = np.argsort(local)  # sorted reads are sequential on disk
            out[np.flatnonzero(mask)[order]] = self.parts[number][local[order]]
        return out

    def iter_shards(self):
        """Yield each shard's (n, D) float32 rows, in order (for building an index without loading everything)."""
        for part in self.parts:
            yield np.asarray(part)
