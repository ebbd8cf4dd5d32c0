"""FAISS indexes over embeddings at four precisions, and search with float rescoring of the candidates.

Precision is how the index stores each vector; the float32 vectors stay on disk (the shards) for rescoring:

============  ==========================  ===========================================================
precision     FAISS storage               bytes / vector (D dims, codes only)
============  ==========================  ===========================================================
float32       the factory string as is    4 D (``Flat``), less with ``PQ`` codes (``IVF4096,PQ64``: 64)
float16       ``SQfp16`` codes            2 D
int8          ``SQ8`` codes               D (a trained per-dimension min/max scalar quantizer, the
                                          same scheme as sentence-transformers' calibrated int8)
ubinary       a binary index (Hamming)    D / 8 (the sign bit of each dimension, packed)
============  ==========================  ===========================================================

Lossy codes (all but float32 ``Flat``/``HNSW``/``IVF..,Flat``) are searched for ``k x rescore_multiplier``
candidates, whose float32 vectors are then scored exactly against the float query, as sentence-transformers'
``semantic_search_faiss(..., rescore_multiplier=)`` does. Scores returned are then exact cosines.

faiss is imported on use, so a bare install can import this module.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import numpy as np

PRECISIONS = ("float32", "float16", "int8", "ubinary")
# precision -> FAISS scalar-quantizer code replacing a "Flat" storage step
_SQ_CODES = {"float16": "SQfp16", "int8": "SQ8"}
DEFAULT_RESCORE_MULTIPLIER = 4
# Exact search up to a few million vectors (it needs no training and its scores are exact; with --precision
# ubinary + rescoring it is also fast and small: BENCHMARKS.md "Corpus search"); a graph index above.
FLAT_UP_TO = 2_000_000

VectorSource = Callable[[np.ndarray], np.ndarray]  # (n,) int64 row ids -> (n, D) float32 vectors


def faiss():
    """The faiss module, with an install hint when it is missing."""
    try:
        import faiss as module
    except ImportError as err:
        raise ImportError("Corpus indexes need FAISS: pip install 'slq_hf[retrieval]' (faiss-cpu).") from err
    return module


def default_factory(num_vectors: int, dim: int) -> str:
    """A FAISS factory string suited to the corpus size: exact ``Flat`` up to ``FLAT_UP_TO`` vectors, else
    ``HNSW32`` (no training pass over the corpus, high recall; with ``ubinary`` its binary twin ``BHNSW32``).

    ``dim`` is accepted for factories that depend on it (PQ sizes); choose ``IVF..,PQ..`` yourself with ``--faiss``
    when memory matters more than recall.
    """
    return "Flat" if num_vectors <= FLAT_UP_TO else "HNSW32"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; expected one of {list(PRECISIONS)}.")
    return precision


def resolve_factory(factory: str, precision: str) -> str:
    """The FAISS factory string that stores ``factory``'s structure at ``precision``.

    ``float32`` keeps the string. ``float16``/``int8`` swap the ``Flat`` storage for ``SQfp16``/``SQ8``
    (``HNSW32`` -> ``HNSW32,SQ8``, ``IVF4096,Flat`` -> ``IVF4096,SQ8``). ``ubinary`` maps to the binary factory
    (``Flat`` -> ``BFlat``, ``HNSW32`` -> ``BHNSW32``, ``IVF4096`` -> ``BIVF4096``). Factories whose storage is
    already compressed (``PQ``, ``SQ``) only make sense at float32.
    """
    check_precision(precision)
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"faiss factory {factory!r} is empty; give a FAISS index-factory string such as 'Flat', "
                         "'HNSW32' or 'IVF4096,PQ64'.")
    factory = factory.replace(" ", "")
    tokens = factory.split(",")
    if precision == "float32":
        # A bare IVF/HNSW structure stores float vectors, as the other precisions read it.
        return f"{factory},Flat" if re.fullmatch(r"IVF\d+(_HNSW\d+)?", tokens[-1]) else factory
    structure = tokens[:-1] if tokens[-1] == "Flat" else tokens
    if structure and not re.fullmatch(r"(HNSW\d+|IVF\d+(_HNSW\d+)?)", structure[-1]) or len(structure) > 1:
        raise ValueError(f"faiss factory {factory!r} already compresses the vectors (or is not one of Flat, HNSWn, "
                         f"IVFn[,Flat]); precision {precision!r} cannot be added to it. Use precision='float32' "
                         "with it, or a Flat/HNSW/IVF factory.")
    if precision == "ubinary":
        if not structure:
            return "BFlat"
        # FAISS spells a binary IVF with an HNSW quantizer "BIVFn_HNSWm"; "BIVFn_BHNSWm" parses as a flat quantizer.
        return "B" + structure[0]
    return ",".join(structure + [_SQ_CODES[precision]])


def is_exact_storage(factory: str, precision: str) -> bool:
    """True when the index returns exact float32 inner products (no rescoring needed)."""
    if precision != "float32":
        return False
    steps = factory.replace(" ", "").split(",")
    # Every step must keep the vectors as they are: a transform (PCA, OPQ, RR, ITQ...) or a code changes the scores.
    keeps = all(re.fullmatch(r"Flat|HNSW\d+|IVF\d+(_HNSW\d+)?|L2norm|IDMap2?", step) for step in steps)
    return keeps and (steps[-1] == "Flat" or re.fullmatch(r"HNSW\d+", steps[-1]) is not None)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(n, D) rows scaled to unit L2 norm (zero rows stay zero), as float32.

    Everything the index stores or is asked is a unit row, so its inner products are cosines (what
    ``slq-hf eval``, sentence-transformers and the Qdrant export rank by) also for a model with ``normalize=False``.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), np.float32(1e-12))


def encode_codes(vectors: np.ndarray, precision: str) -> np.ndarray:
    """(n, D) float32 -> what the index ingests: float32 rows, or for ubinary (n, ceil(D/8)) uint8 sign bits.

    The bits are ``np.packbits(x > 0)``, exactly sentence-transformers' ``quantize_embeddings(x, "ubinary")``.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if precision == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    return vectors


def new_index(dim: int, factory: str, precision: str) -> Any:
    """An empty FAISS index (inner-product metric for float indexes, Hamming for ubinary)."""
    module = faiss()
    resolved = resolve_factory(factory, precision)
    try:
        if precision == "ubinary":
            return module.index_binary_factory(8 * math.ceil(dim / 8), resolved)
        return module.index_factory(dim, resolved, module.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].rsplit(": ", 1)[-1]
        raise ValueError(f"FAISS cannot build index {resolved!r} (from factory {factory!r}, precision "
                         f"{precision!r}) for {dim}-dim vectors: {reason}. See the FAISS wiki's 'The index "
                         "factory' page for the syntax.") from err


def training_rows(index: Any) -> int:
    """How many vectors training should see: 0 for indexes without training, else FAISS's comfortable amount."""
    if index.is_trained:
        return 0
    nlist = getattr(index, "nlist", 0) or getattr(getattr(index, "index", None), "nlist", 0) or 1
    # k-means wants >= 39 points per centroid (FAISS warns below); PQ's 256 centroids per sub-quantizer ~10k points.
    return max(40 * nlist, 16_384)


def train(index: Any, sample: np.ndarray, precision: str) -> None:
    """Train ``index`` (IVF centroids, PQ/SQ codebooks) on (n, D) float32 ``sample`` rows; no-op if untrainable."""
    if index.is_trained:
        return
    try:
        index.train(encode_codes(unit_rows(sample), precision))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].rsplit(": ", 1)[-1]
        raise ValueError(f"FAISS could not train the index on {len(sample)} vectors ({reason}); it wants about "
                         f"{training_rows(index)}. Use a smaller IVF (e.g. IVF16) or 'Flat' for a corpus this "
                         "small.") from err


def add(index: Any, vectors: np.ndarray, precision: str) -> None:
    """Append (n, D) float32 rows (stored as unit rows); their FAISS ids continue from ``index.ntotal``."""
    codes = encode_codes(unit_rows(vectors), precision)
    if isinstance(index, faiss().IndexIDMap):  # IDMap/IDMap2 refuse add(): give them the same consecutive row ids
        index.add_with_ids(codes, np.arange(index.ntotal, index.ntotal + len(codes), dtype=np.int64))
    else:
        index.add(codes)


def configure_search(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF ``nprobe`` / HNSW ``efSearch`` wherever they live in the index (also inside a binary index)."""
    module = faiss()
    ivf = None
    try:
        ivf = module.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        ivf = index if hasattr(index, "nprobe") else None
    if ivf is not None and nprobe is not None:
        ivf.nprobe = min(int(nprobe), ivf.nlist)
    # FAISS hands wrapped indexes (behind a PCA/OPQ/L2norm pre-transform or an IDMap, an IVF's quantizer) back as
    # the base class, which has no ``hnsw``: downcast them, or efSearch silently stays at FAISS's 16.
    inner = index
    while getattr(inner, "hnsw", None) is None and isinstance(inner, (module.IndexPreTransform, module.IndexIDMap)):
        inner = module.downcast_index(inner.index)
    if getattr(inner, "hnsw", None) is None and ivf is not None:
        binary = isinstance(ivf, module.IndexBinary)
        inner = (module.downcast_IndexBinary if binary else module.downcast_index)(ivf.quantizer)
    hnsw = getattr(inner, "hnsw", None)
    if hnsw is not None and ef_search is not None:
        hnsw.efSearch = int(ef_search)


def index_bytes(index: Any) -> int:
    """Size of the serialised index: what it costs in memory once loaded."""
    module = faiss()
    if isinstance(index, module.IndexBinary):
        return int(module.serialize_index_binary(index).nbytes)
    return int(module.serialize_index(index).nbytes)


def search(index: Any, queries: np.ndarray, k: int, *, precision: str, exact_scores: bool,
           rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
           vectors: VectorSource | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``index`` for each query.

    Args:
        queries: (Q, D) float32; scaled to unit norm here, as the corpus rows were (:func:`unit_rows`).
        exact_scores: the index itself returns exact float inner products (:func:`is_exact_storage`).
        rescore_multiplier: for lossy indexes, fetch ``k * rescore_multiplier`` candidates and rescore them with
            the float32 vectors from ``vectors``.
        vectors: row ids -> float32 vectors (the shards on disk); required unless ``exact_scores``.

    Returns:
        scores (Q, k) float32 (cosines, descending), ids (Q, k) int64; -1 / -inf pad short results.
    """
    # numbers.Integral: a numpy integer (k from an array's length or argmax) is an integer too
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r} is invalid; expected a positive integer.")
    if (isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, numbers.Integral)
            or rescore_multiplier < 1):
        raise ValueError(f"rescore_multiplier={rescore_multiplier!r} is invalid; expected an integer >= 1.")
    k, rescore_multiplier = int(k), int(rescore_multiplier)
    queries = np.ascontiguousarray(unit_rows(queries))
    ntotal = int(index.ntotal)
    if exact_scores:
        scores, ids = index.search(queries, min(k, max(ntotal, 1)))
        return _pad(scores.astype(np.float32), ids, k)
    if vectors is None:
        raise ValueError("This index stores lossy codes; rescoring needs the float32 vectors (the index's shards).")
    fetch = min(k * rescore_multiplier, max(ntotal, 1))
    _, candidates = index.search(encode_codes(queries, precision), fetch)
    candidates = candidates.astype(np.int64)
    valid = candidates >= 0
    flat = np.where(valid, candidates, 0).reshape(-1)
    unique, inverse = np.unique(flat, return_inverse=True)  # one disk read per distinct row
    rows = unit_rows(vectors(unique))[inverse].reshape(*candidates.shape, -1)  # (Q, fetch, D)
    rescored = np.einsum("qd,qcd->qc", queries, rows, dtype=np.float32)
    rescored[~valid] = -np.inf
    order = np.argsort(-rescored, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(candidates, order, axis=1)
    scores = np.take_along_axis(rescored, order, axis=1)
    picked[~np.isfinite(scores)] = -1
    return _pad(scores, picked, k)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = scores.astype(np.float32), ids.astype(np.int64)
    scores[ids < 0] = -np.inf
    if ids.shape[1] < k:
        extra = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=-1)
    return scores, ids
