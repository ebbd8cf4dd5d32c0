"""What an index was built from: the model's fingerprint, the data's fingerprint, the build settings.

``INDEX_DIR/manifest.json`` is written before the first shard. A later build into the same folder compares
fingerprints: the same model and data resume; anything else is refused unless ``overwrite``. Search compares the
searching model's fingerprint with the builder's, because embeddings of two models are not comparable.

The model fingerprint covers what changes an embedding and nothing else: the SLQ and backbone configs (without
paths, dtypes and library versions, so a local copy of the same backbone still matches), the weights of the query
set that embedded the corpus, its name, and the projection head if there is one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..modeling.checkpoint import atomic_write

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Config keys that say where or how a model was loaded, not what it computes.
_VOLATILE = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
             "backbone_name_or_path", "backbone_revision", "architectures", "auto_map", "_attn_implementation",
             "attn_implementation", "_attn_implementation_autoset", "use_cache", "quantization_config",
             "slq_hf_version", "torch_version"}


class IndexMismatchError(ValueError):
    """The model or data differ from the ones recorded in an index's manifest."""


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _config_dict(config: Any) -> dict:
    return _clean(config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)))


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _query_store(model: Any) -> Any:
    """The model's query-set container when it has one (a ``LatentQueries`` module), else None."""
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        if type(module).__name__ == "LatentQueries":
            return module
    return None


def active_query_set(model: Any) -> str:
    store = _query_store(model)
    if store is not None:
        return store.active
    return getattr(model, "active_query_set", "default")


def query_set_tensor(model: Any, name: str) -> torch.Tensor:
    """The (N_q, hidden) queries of set ``name``; ValueError naming the available sets if it does not exist."""
    store = _query_store(model)
    try:
        if store is not None:
            return store.lookup(name)
        if hasattr(model, "get_query_set"):
            return model.get_query_set(name)
    except (KeyError, ValueError) as err:
        raise ValueError(f"The model has no query set {name!r}: {err}") from err
    if name != "default":
        raise ValueError(f"The model has no query set {name!r}; it has only its default queries.")
    return model.queries


@contextlib.contextmanager
def using_query_set(model: Any, name: str | None) -> Iterator[None]:
    """Make ``name`` the active query set inside the block (no-op for None)."""
    if name is None:
        yield
        return
    query_set_tensor(model, name)  # clear error before anything changes
    store = _query_store(model)
    if store is not None:
        with store.use(name):
            yield
    elif hasattr(model, "use_query_set"):
        with model.use_query_set(name):
            yield
    else:
        yield


def model_fingerprint(model: Any, query_set: str | None = None) -> dict[str, str]:
    """{"fingerprint", "config", "queries", "query_set"} of ``model`` embedding with ``query_set`` (default: the
    active set). Each part is a sha256 hex digest except "query_set" (the name)."""
    name = query_set or active_query_set(model)
    config = {"slq": _config_dict(model.config)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and getattr(backbone, "config", None) is not None:
        config["backbone"] = _config_dict(backbone.config)
    config_digest = _digest(json.dumps(config, sort_keys=True, default=str).encode())
    hasher = hashlib.sha256()
    tensors = {"queries": query_set_tensor(model, name)}
    projection = getattr(model, "projection", None)
    if projection is not None:
        tensors.update({f"projection.{k}": v for k, v in projection.state_dict().items()})
    for key, tensor in sorted(tensors.items()):
        array = tensor.detach().float().cpu().contiguous()
        hasher.update(f"{key}|{tuple(array.shape)}|".encode())
        hasher.update(array.numpy().tobytes())
    queries_digest = hasher.hexdigest()
    combined = _digest(f"{config_digest}|{queries_digest}|{name}".encode())
    return {"fingerprint": combined, "config": config_digest, "queries": queries_digest, "query_set": name}


def describe_model_difference(recorded: dict, current: dict) -> str:
    parts = []
    if recorded.get("config") != current.get("config"):
        parts.append("the model/backbone configuration differs")
    if recorded.get("query_set") != current.get("query_set"):
        parts.append(f"the query set differs ({recorded.get('query_set')!r} vs {current.get('query_set')!r})")
    elif recorded.get("queries") != current.get("queries"):
        parts.append("the query weights differ (another training run or checkpoint)")
    return "; ".join(parts) or "the fingerprints differ"


def data_fingerprint(item_keys: list[str]) -> str:
    """Digest of the corpus: every item's key, in order."""
    hasher = hashlib.sha256()
    for key in item_keys:
        hasher.update(key.encode())
    return hasher.hexdigest()


def read_manifest(index_dir: str | os.PathLike) -> dict | None:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable index manifest ({err}); rebuild with --overwrite.") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an slq_hf index manifest of format {FORMAT_VERSION}; rebuild with --overwrite.")
    return manifest


def write_manifest(index_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written manifest."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(index_dir) / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
