"""Corpus-scale retrieval with SLQ: sharded resumable encoding, a FAISS index, search, vector-database export.

Typical use::

    from slq_hf import SLQModel
    from slq_hf.retrieval import CorpusIndex, build_index

    model = SLQModel.from_pretrained("my_slq")
    build_index(model, "photos/", "photos_index")          # resumable; torchrun splits the shards over ranks
    index = CorpusIndex.load("photos_index")
    hits = index.search(model, ["a red triangle in the top left"], k=5)[0]

FAISS (``faiss-cpu``), pyarrow and qdrant-client come with ``pip install 'slq_hf[retrieval]'``; they are imported on
use, so this package imports without them.
"""

from .build import BAD_ITEMS, DEFAULT_SHARD_SIZE, INDEX_FILE, build_faiss, build_index
from .corpus import (
    CORPUS_FORMATS,
    Corpus,
    CorpusItem,
    detect_corpus_format,
    read_corpus,
    read_image_folder,
    read_items_jsonl,
)
from .encode import BadItemError, EncodeSummary, encode_corpus
from .export import export_qdrant
from .faiss_index import PRECISIONS, default_factory, resolve_factory
from .manifest import IndexMismatchError, model_fingerprint
from .search import CorpusIndex, SearchHit

__all__ = [
    "BAD_ITEMS",
    "CORPUS_FORMATS",
    "DEFAULT_SHARD_SIZE",
    "INDEX_FILE",
    "PRECISIONS",
    "BadItemError",
    "Corpus",
    "CorpusIndex",
    "CorpusItem",
    "EncodeSummary",
    "IndexMismatchError",
    "SearchHit",
    "build_faiss",
    "build_index",
    "default_factory",
    "detect_corpus_format",
    "encode_corpus",
    "export_qdrant",
    "model_fingerprint",
    "read_corpus",
    "read_image_folder",
    "read_items_jsonl",
    "resolve_factory",
]
