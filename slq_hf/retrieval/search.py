"""Search a built index: :class:`CorpusIndex`.

    from slq_hf import SLQModel
    from slq_hf.retrieval import CorpusIndex

    index = CorpusIndex.load("my_index")
    model = SLQModel.from_pretrained("my_slq")
    for hit in index.search(model, ["an animal with nine lives"], k=5)[0]:
        print(hit.rank, hit.score, hit.id, hit.path)

Queries are texts (``str``: always text, never a file name), PIL images, :class:`pathlib.Path` image files or
``{"image", "text"}`` dicts. The model must be the one that built the index (same fingerprint), or search refuses.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import faiss_index as fi
from .build import BAD_ITEMS, INDEX_FILE
from .manifest import IndexMismatchError, describe_model_difference, model_fingerprint, read_manifest, using_query_set
from .shards import ShardVectors, shard_paths


@dataclass
class SearchHit:
    """One result: ``rank`` (1-based), ``score`` (inner product of L2-normalised embeddings = cosine), the item."""

    rank: int
    score: float
    id: str
    row: int
    position: int
    image: str | None = None
    path: str | None = None
    text: str | None = None
    metadata: dict = field(default_factory=dict)
    rerank_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class CorpusIndex:
    """A built index folder: FAISS index + shard embeddings (memory-mapped) + item rows."""

    def __init__(self, index_dir: str | os.PathLike, manifest: dict, index: Any, rows: Any, vectors: ShardVectors):
        self.index_dir, self.manifest, self.index, self.rows, self.vectors = Path(index_dir), manifest, index, rows, \
            vectors

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, nprobe: int | None = None,
             ef_search: int | None = None) -> CorpusIndex:
        """Open ``index_dir`` (written by :func:`build_index`); ``nprobe``/``ef_search`` tune IVF/HNSW search."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise FileNotFoundError(f"{index_dir}: no manifest.json; not an index built by `slq-hf index build`.")
        if not manifest.get("index") or not (index_dir / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{index_dir}: the build has not finished (no {INDEX_FILE}); re-run the same "
                                    "`slq-hf index build` command to resume it.")
        faiss = fi.faiss()
        if manifest["index"]["precision"] == "ubinary":
            index = faiss.read_index_binary(str(index_dir / INDEX_FILE))
        else:
            index = faiss.read_index(str(index_dir / INDEX_FILE))
        num_shards = manifest["num_shards"]
        rows = pa.concat_tables([pq.read_table(str(shard_paths(index_dir, n)["rows"])) for n in range(num_shards)])
        vectors = ShardVectors(index_dir, num_shards)
        if not (index.ntotal == len(vectors) == len(rows) == manifest["num_vectors"]):
            raise ValueError(f"{index_dir}: the index holds {index.ntotal} vectors, the shards {len(vectors)} and "
                             f"the manifest {manifest['num_vectors']}; the folder was changed by hand. Rebuild it.")
        loaded = cls(index_dir, manifest, index, rows, vectors)
        loaded.configure(nprobe=nprobe, ef_search=ef_search)
        return loaded

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists probed / HNSW candidate list size (defaults: 1/16 of the lists, at least 16; 128)."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                flag = " (--nprobe)" if name == "nprobe" else ""
                raise ValueError(f"{name}={value!r}{flag} is invalid; expected a positive integer.")
        nlist = getattr(_ivf(self.index), "nlist", None)
        if nprobe is None and nlist:
            nprobe = min(nlist, max(16, nlist // 16))
        fi.configure_search(self.index, nprobe=nprobe, ef_search=ef_search or 128)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        info = self.manifest["index"]
        return (f"CorpusIndex({str(self.index_dir)!r}, vectors={len(self)}, factory={info['factory']!r}, "
                f"precision={info['precision']!r}, query_set={self.manifest['model']['query_set']!r})")

    @property
    def bad_items(self) -> list[dict]:
        """Items the build skipped: {"position", "id", "where", "image", "reason"}."""
        path = self.index_dir / BAD_ITEMS
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # ------------------------------------------------------------------------------------------------- model side
    def check_model(self, model: Any) -> None:
        """Raise :class:`IndexMismatchError` unless ``model`` embeds like the model that built the index."""
        recorded = self.manifest["model"]
        try:
            current = model_fingerprint(model, query_set=recorded["query_set"])
        except ValueError as err:
            raise IndexMismatchError(f"{self.index_dir} was built with query set {recorded['query_set']!r}, which "
                                     f"this model does not have ({err}).") from err
        if current["fingerprint"] != recorded["fingerprint"]:
            raise IndexMismatchError(
                f"{self.index_dir} was built by another model ({recorded.get('source')!r}): "
                f"{describe_model_difference(recorded, current)}. Its embeddings are not comparable with this "
                "model's; search with the model that built it, or rebuild the index with this one.")

    def encode_queries(self, model: Any, queries: list, *, batch_size: int = 16, query_set: str | None = None):
        """(Q, D) float32 query embeddings, with ``query_set`` (default: the set that embedded the corpus)."""
        self.check_model(model)
        inputs = [_query_input(q, n) for n, q in enumerate(queries)]
        with using_query_set(model, query_set or self.manifest["model"]["query_set"]):
            out = model.encode(inputs, batch_size=batch_size, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def search(self, model: Any, queries: Any, k: int = 10, *, batch_size: int = 16, query_set: str | None = None,
               rescore_multiplier: int | None = None) -> list[list[SearchHit]]:
        """Top-``k`` items for each query (one query alone is accepted too: the result is then still a list of
        lists). See the module docstring for query types."""
        if not isinstance(queries, list):
            queries = [queries]
        if not queries:
            return []
        embeddings = self.encode_queries(model, queries, batch_size=batch_size, query_set=query_set)
        scores, rows = self.search_embeddings(embeddings, k, rescore_multiplier=rescore_multiplier)
        return self.hits(scores, rows)

    # ------------------------------------------------------------------------------------------------ vector side
    def search_embeddings(self, embeddings: Any, k: int = 10, *,
                          rescore_multiplier: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) query embeddings -> scores (Q, k) float32 and rows (Q, k) int64 (-1 pads short results).

        ``rescore_multiplier`` (lossy indexes): candidates fetched per result before float32 rescoring
        (default 4, sentence-transformers' choice; raise it for more recall).
        """
        embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if embeddings.ndim != 2 or embeddings.shape[1] != self.vectors.dim:
            raise ValueError(f"Query embeddings have shape {embeddings.shape}; expected (Q, {self.vectors.dim}), the "
                             "width of the index's vectors.")
        if not np.isfinite(embeddings).all():  # FAISS would rank them anyway and return -inf scores / -1 rows
            raise ValueError("Query embeddings contain NaN or Inf values; check the model's weights and dtype.")
        info = self.manifest["index"]
        return fi.search(self.index, embeddings, k, precision=info["precision"], exact_scores=info["exact_scores"],
                         rescore_multiplier=fi.DEFAULT_RESCORE_MULTIPLIER if rescore_multiplier is None
                         else rescore_multiplier,
                         vectors=self.vectors.take)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[SearchHit]]:
        flat = sorted({int(r) for r in rows.reshape(-1) if r >= 0})
        records = dict(zip(flat, self.rows.take(flat).to_pylist())) if flat else {}
        root = self.manifest["data"].get("root")
        has_paths = self.manifest["data"].get("format") != "hf"
        out = []
        for query_scores, query_rows in zip(scores, rows):
            hits = []
            for rank, (score, row) in enumerate(zip(query_scores, query_rows), start=1):
                if row < 0:
                    continue
                record = records[int(row)]
                image = record["image"]
                path = _item_path(root, image) if image and root and has_paths else None
                hits.append(SearchHit(rank=rank, score=float(score), id=record["id"], row=int(row),
                                      position=int(record["position"]), image=image, path=path, text=record["text"],
                                      metadata=json.loads(record["metadata"])))
            out.append(hits)
        return out

    def embeddings(self, rows: Any) -> np.ndarray:
        """Float32 embeddings of index rows (from the shards)."""
        return self.vectors.take(np.asarray(rows, dtype=np.int64))

    def to_dataset(self, with_embeddings: bool = True):
        """The index rows as a ``datasets.Dataset`` (plus an ``embedding`` column): ready for
        ``add_faiss_index("embedding")``, ``push_to_hub`` or pandas."""
        import datasets
        import pyarrow as pa

        table = self.rows
        if with_embeddings:
            matrix = np.concatenate(list(self.vectors.iter_shards())) if len(self) else np.zeros((0, 0))
            column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])
            table = table.append_column("embedding", column)
        return datasets.Dataset(table)


def rerank_hits(model: Any, query: Any, hits: list[SearchHit], *, scorer: str = "likelihood",
                batch_size: int = 8) -> list[SearchHit]:
    """Re-order ``hits`` of one query by the frozen backbone's own score of each (query, item) pair
    (``slq_hf.modeling.reranking.rerank``: generative likelihood or yes/no). Ranks are renumbered; each hit gets
    ``rerank_score``; the embedding ``score`` is kept."""
    from ..modeling.reranking import rerank

    if not hits:
        return []
    candidates = []
    for hit in hits:
        if hit.path is None and hit.image is not None:
            raise ValueError(f"Item {hit.id!r} has no image file on disk to rerank with (hf datasets corpora).")
        # A Path is always an image; a str is one only if it looks like a path ("my pics/photo 1", with a space and
        # no extension, would be scored as a caption).
        image = None if hit.path is None else Path(hit.path)
        # {"text": ...}: a stored text is a text even when it looks like a file name ("IMG_0042.JPG")
        candidates.append(image if hit.text is None else {"text": hit.text, **({"image": image} if image else {})})
    result = rerank(model.backbone, model.processor, _query_input(query, 0), candidates, scorer,
                    batch_size=batch_size)
    out = []
    for rank, position in enumerate(result.order.tolist(), start=1):
        hit = hits[position]
        out.append(SearchHit(**{**hit.to_dict(), "rank": rank, "rerank_score": float(result.scores[position])}))
    return out


def _item_path(root: str, image: str) -> str:
    """The file an item's stored image reference names, resolved as the corpus reader did: ``~`` expanded, an
    absolute path kept, a relative one under the corpus root."""
    return str(Path(root) / Path(image).expanduser())


def _ivf(index: Any) -> Any:
    try:
        return fi.faiss().extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return index if hasattr(index, "nlist") else None


def _query_input(query: Any, position: int) -> Any:
    from PIL import Image

    if isinstance(query, str):
        if not query.strip():
            raise ValueError(f"Query {position} is an empty text.")
        return {"text": query}
    if isinstance(query, Path):
        from ..processing import load_image

        return load_image(query)
    if isinstance(query, (Image.Image, dict)):
        return query
    raise TypeError(f"Query {position} is a {type(query).__name__}; expected a text (str), a PIL image, a "
                    "pathlib.Path to an image, or an {'image', 'text'} dict.")
