"""Export an index to Qdrant: vectors, ids and metadata, through the same client code for every deployment.

``path=`` runs Qdrant's client in local (embedded) mode, ``url=`` talks to a server or Qdrant Cloud; everything
after building the client is one code path. Point ids are the index rows (0..N-1); the payload holds the item id,
image, text and metadata, plus the index's model fingerprint, so an application can check it embeds queries with
the same model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .search import CorpusIndex


def qdrant_client(path: str | os.PathLike | None = None, url: str | None = None, api_key: str | None = None):
    """A ``QdrantClient``: local mode at ``path``, or the server at ``url``; exactly one of them."""
    if (path is None) == (url is None):
        raise ValueError("Give exactly one of path= (a local Qdrant folder) or url= (a Qdrant server).")
    try:
        from qdrant_client import QdrantClient
    except ImportError as err:
        raise ImportError("Exporting to Qdrant needs qdrant-client: pip install 'slq_hf[retrieval]'.") from err
    return QdrantClient(path=str(path)) if path is not None else QdrantClient(url=url, api_key=api_key)


def export_qdrant(index: CorpusIndex | str | os.PathLike, collection: str, *, path: str | os.PathLike | None = None,
                  url: str | None = None, api_key: str | None = None, client: Any = None, batch_size: int = 256,
                  overwrite: bool = False, show_progress_bar: bool | None = None) -> dict:
    """Write every row of ``index`` into Qdrant collection ``collection`` (cosine distance).

    Args:
        index: a loaded :class:`CorpusIndex` or its folder.
        path / url / api_key: where Qdrant is (see :func:`qdrant_client`), unless ``client`` is given.
        overwrite: replace an existing collection of that name (otherwise refuse).

    Returns:
        {"collection", "points", "dim"}.
    """
    from qdrant_client import models
    from qdrant_client.http.exceptions import ApiException
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        # range(0, N, -1) is empty: the export would report N points and write none
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer.")
    index = index if isinstance(index, CorpusIndex) else CorpusIndex.load(index)
    own_client = client is None
    client = client if client is not None else qdrant_client(path, url, api_key)
    try:
        if client.collection_exists(collection):
            if not overwrite:
                raise ValueError(f"Qdrant collection {collection!r} already exists; pass overwrite=True "
                                 "(--overwrite) to replace it, or choose another name.")
            client.delete_collection(collection)
        dim = index.vectors.dim
        client.create_collection(collection, vectors_config=models.VectorParams(size=dim,
                                                                                distance=models.Distance.COSINE))
        model = index.manifest["model"]
        common = {"slq_fingerprint": model["fingerprint"], "slq_query_set": model["query_set"]}
        total = len(index)
        disable = None if show_progress_bar is None else not show_progress_bar
        with tqdm(total=total, desc="qdrant", unit="point", disable=disable) as bar:
            for start in range(0, total, batch_size):
                rows = np.arange(start, min(start + batch_size, total))
                vectors = index.embeddings(rows)
                records = index.rows.slice(start, len(rows)).to_pylist()
                points = [models.PointStruct(id=int(row), vector=vector.tolist(),
                                             payload={"id": record["id"], "image": record["image"],
                                                      "text": record["text"],
                                                      "metadata": json.loads(record["metadata"]), **common})
                          for row, vector, record in zip(rows, vectors, records)]
                client.upsert(collection, points=points, wait=True)
                bar.update(len(rows))
        return {"collection": collection, "points": total, "dim": dim}
    except ApiException as err:  # server unreachable, refused the key, or answered an error
        where = url or path or "the given client"
        raise ConnectionError(f"Qdrant at {where}: {' '.join(str(err).split())}. Check that the server runs and that "
                              "the URL and API key are right; a collection this export had begun stays partial, so "
                              "re-run with --overwrite.") from err
    finally:
        if own_client:
            client.close()
