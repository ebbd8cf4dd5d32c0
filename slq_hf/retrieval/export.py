"""Export an index to Qdrant: vectors, ids and metadata, through the same client code for every deployment.

``path=`` runs Qdrant's client in local (embedded) mode, ``url=`` talks to a server or Qdrant Cloud; everything
after building the client is one code path. Point ids are the index rows (0..N-1); the payload holds the item id,
image, text and metadata, plus the index's model fingerprint, so an application can check it embeds queries with
the same model.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import suppress
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

    A failed export never leaves a partial collection under ``collection``, and ``overwrite`` never costs the
    existing one before its replacement is complete: the points go into a new collection first, which then takes
    the name as an alias (Qdrant's way to swap collections; queries by the name reach it), and only then does the
    old collection go. The first overwrite of a plain collection leaves the name unresolved for the moment between
    deleting it and creating the alias; later overwrites switch the alias in one step.

    Args:
        index: a loaded :class:`CorpusIndex` or its folder.
        path / url / api_key: where Qdrant is (see :func:`qdrant_client`), unless ``client`` is given.
        overwrite: replace an existing collection (or alias) of that name (otherwise refuse).

    Returns:
        {"collection", "points", "dim"}.
    """
    from qdrant_client.http.exceptions import ApiException

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        # range(0, N, -1) is empty: the export would report N points and write none
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer.")
    index = index if isinstance(index, CorpusIndex) else CorpusIndex.load(index)
    own_client = client is None
    client = client if client is not None else qdrant_client(path, url, api_key)
    try:
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        exists = collection in aliases or client.collection_exists(collection)
        if exists and not overwrite:
            raise ValueError(f"Qdrant collection {collection!r} already exists; pass overwrite=True "
                             "(--overwrite) to replace it, or choose another name.")
        target = f"{collection}-slq-{uuid.uuid4().hex[:8]}" if exists else collection
        try:
            _write_points(client, index, target, batch_size, show_progress_bar)
        except BaseException:
            with suppress(Exception):  # the server may be the reason; then the partial collection stays there
                client.delete_collection(target)
            raise
        if exists:
            _take_name(client, collection, target, aliases.get(collection))
        return {"collection": collection, "points": len(index), "dim": index.vectors.dim}
    except ApiException as err:  # server unreachable, refused the key, or answered an error
        where = url or path or "the given client"
        raise ConnectionError(f"Qdrant at {where}: {' '.join(str(err).split())}. Check that the server runs and that "
                              "the URL and API key are right, then run the export again; an existing collection of "
                              "that name is left as it was.") from err
    finally:
        if own_client:
            client.close()


def _write_points(client: Any, index: CorpusIndex, collection: str, batch_size: int,
                  show_progress_bar: bool | None) -> None:
    """Create ``collection`` and upsert every row of ``index`` into it: point id = row, payload = the item."""
    from qdrant_client import models
    from tqdm.auto import tqdm

    client.create_collection(collection, vectors_config=models.VectorParams(size=index.vectors.dim,
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
                                         payload={"id": record["id"], "image": record["image"], "text": record["text"],
                                                  "metadata": json.loads(record["metadata"]), **common})
                      for row, vector, record in zip(rows, vectors, records)]
            client.upsert(collection, points=points, wait=True)
            bar.update(len(rows))


def _take_name(client: Any, name: str, new: str, aliased: str | None) -> None:
    """Make ``name`` an alias of the complete collection ``new``, then delete what ``name`` was (a collection, or
    the collection the alias ``name`` pointed at, ``aliased``)."""
    from qdrant_client import models

    create = models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=new, alias_name=name))
    if aliased is None:  # a plain collection cannot become an alias while it exists
        client.delete_collection(name)
        client.update_collection_aliases(change_aliases_operations=[create])
        return
    drop = models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name))
    client.update_collection_aliases(change_aliases_operations=[drop, create])  # one step: never unresolved
    client.delete_collection(aliased)
