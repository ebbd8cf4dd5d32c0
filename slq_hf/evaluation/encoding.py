"""Streaming, cached encoding of evaluation inputs.

Anything that embeds can be evaluated:

- an object with ``encode(inputs, batch_size=..., show_progress_bar=...)`` returning an (N, D) tensor or array
  (``SLQModel``, a ``SentenceTransformer``);
- a plain callable ``fn(inputs) -> (N, D)`` (e.g. a last-token-pooling baseline written in a few lines).

Inputs reach the model as texts (``str``; ``{"text": str}`` for SLQModel, so a caption such as "cat.png" is never
mistaken for a path), PIL images, and ``{"image": PIL, "text": str}`` composed queries. Images are opened one chunk
at a time, so a 5k-image test set never sits decoded in memory.

Cache: with ``cache_dir`` the embeddings of each input list are stored as safetensors under a key derived from
everything that changes an embedding: the model (:func:`model_fingerprint`: weights, active query set, config,
processor and chat template, truncation, normalisation, prompts, dtype, image limits), the instruction and any
``encode_kwargs``, and the inputs' content (texts, the bytes of image files, or image pixels). Re-running an
evaluation, or evaluating another caption set on the same images, skips the image encoding; changing any of those
settings encodes again. Things that cannot change an embedding (the temperature, query sets that are not active)
are left out of the key, so they never cost a re-encode.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.records import file_digest
from ..modeling.checkpoint import atomic_write
from ..processing import load_image
from .data import DatasetImage, ImageSource

# "2": the key covers the active query set, truncation, prompts, chat template and image limits (issue: "1" keys
# returned the default set's vectors after switching sets).
CACHE_VERSION = "2"
# Tensors up to this many elements are hashed whole; larger ones (backbone matrices) at evenly spaced samples, so
# fingerprinting a 2B-parameter backbone costs milliseconds, not a full pass over its weights.
_FULL_HASH_ELEMENTS = 1 << 20
_SAMPLES_PER_TENSOR = 1 << 14

Encoder = Any  # object with .encode(...) or a callable; see the module docstring


def _tensor_digest(hasher, name: str, tensor: torch.Tensor) -> None:
    hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.device.type == "meta":
        return
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _FULL_HASH_ELEMENTS:
        index = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
        flat = flat[index]
    flat = flat.cpu().contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    hasher.update(flat.view(torch.uint8).numpy().tobytes())


def _json_default(value: Any) -> str:
    return repr(value)


def _processor_settings(processor: Any) -> dict[str, Any]:
    """Processor settings that change what the model sees: image sizes/limits, chat template, tokenizer."""
    out: dict[str, Any] = {"class": type(processor).__qualname__}
    if hasattr(processor, "to_json_string"):
        try:
            out["json"] = processor.to_json_string()
        except (TypeError, ValueError):  # a non-serialisable attribute: the class still counts
            pass
    out["chat_template"] = getattr(processor, "chat_template", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = None
        if hasattr(backend, "to_str"):
            # Padding/truncation state changes with every processor call; the rest is the tokenizer itself.
            state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
            vocab = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
        out["tokenizer"] = [type(tokenizer).__qualname__, len(tokenizer), vocab,
                            getattr(tokenizer, "chat_template", None), getattr(tokenizer, "truncation_side", None),
                            getattr(tokenizer, "model_max_length", None)]
    return out


def _query_set_settings(model: torch.nn.Module) -> tuple[dict[str, Any], set[int]]:
    """SLQ models (also inside a SentenceTransformer): the active query set of each (name + digest of its tensor),
    and the storage of every query set, which is then left out of the state-dict hash (a set that is not active
    changes no embedding)."""
    settings: dict[str, Any] = {}
    storages: set[int] = set()
    for path, module in model.named_modules():
        active = getattr(module, "active_query_set", None)
        if not isinstance(active, str):
            continue
        hasher = hashlib.sha256()
        queries = getattr(module, "active_queries", None)
        if isinstance(queries, torch.Tensor):
            _tensor_digest(hasher, "active", queries)
        settings[path or "model"] = {"active_query_set": active, "active_queries": hasher.hexdigest()}
        names, lookup = getattr(module, "query_sets", None), getattr(module, "get_query_set", None)
        if isinstance(names, (list, tuple)) and callable(lookup) and isinstance(queries, torch.Tensor):
            storages.update(t.data_ptr() for t in map(lookup, names) if isinstance(t, torch.Tensor))
    return settings, storages


def _input_limits() -> dict[str, Any]:
    """The library's module-level input settings (allowed image formats, decode limits, ...), read at call time:
    changing one changes which images load and how they are shrunk."""
    import importlib

    limits: dict[str, Any] = {}
    for name in ("slq_hf.modeling.processing_slq", "slq_hf.modeling.image_files"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # the module layout differs in this version: what exists still counts
            continue
        limits.update({f"{name}.{key}": value for key, value in vars(module).items()
                       if key.isupper() and isinstance(value, (int, float, str, tuple, dict))})
    return limits


def model_settings(model: torch.nn.Module) -> dict[str, Any]:
    """Everything besides the weights that changes a model's embeddings, as JSON-able values.

    Config (SLQ: pooling, normalisation, head), processor + chat template + tokenizer, the active query set,
    sentence-transformers' ``truncate_dim`` / ``prompts`` / ``default_prompt_name`` / ``max_seq_length`` and each
    module's config (a ``Normalize`` module shows up here: it has no weights), and the library's input limits.
    """
    settings: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                                "input_limits": _input_limits()}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        settings["config"] = config.to_json_string(use_diff=False)
    processor = getattr(model, "processor", None)
    if processor is not None:
        settings["processor"] = _processor_settings(processor)
    settings["query_sets"] = _query_set_settings(model)[0]
    for attribute in ("truncate_dim", "prompts", "default_prompt_name", "max_seq_length"):
        if hasattr(model, attribute):
            settings[attribute] = getattr(model, attribute)
    modules = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.ParameterDict, torch.nn.ParameterList)):
            continue  # parameter containers compute nothing (SLQ's query sets live in one); their tensors count below
        entry: list[Any] = [name, type(module).__qualname__]
        if name and hasattr(module, "get_config_dict"):  # sentence-transformers modules (Transformer, Normalize...)
            try:
                entry.append(module.get_config_dict())
            except Exception:  # a module whose config cannot be read: its type still counts
                pass
        if name and hasattr(module, "processor") and module.processor is not processor:
            entry.append(_processor_settings(module.processor))
        modules.append(entry)
    settings["modules"] = hashlib.sha256(json.dumps(modules, sort_keys=True, default=_json_default).encode()
                                         ).hexdigest()
    return settings


def model_fingerprint(model: Encoder) -> str:
    """A hex digest that changes whenever the model's embeddings can change.

    ``nn.Module``: :func:`model_settings` plus every state-dict tensor (name, shape, dtype and values; tensors above
    a million elements at evenly spaced samples). Left out because they cannot change an embedding: SLQ's
    ``logit_scale`` (the training temperature) and query sets other than the active one. A plain callable has no
    inspectable state: pass ``model_id=`` to the encoders to cache it.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"Cannot fingerprint a {type(model).__name__} for the embedding cache; pass model_id= "
                         "(a string that changes whenever the model does) or no cache_dir.")
    hasher = hashlib.sha256(json.dumps(model_settings(model), sort_keys=True, default=_json_default).encode())
    _, query_storages = _query_set_settings(model)
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] == "logit_scale" or tensor.data_ptr() in query_storages:
            continue
        _tensor_digest(hasher, name, tensor)
    return hasher.hexdigest()


def _source_key(source: ImageSource) -> str:
    # Image files are keyed on their bytes, not on path + size + mtime: a picture replaced by another of the same
    # size with the mtime kept (`cp -p`, `touch -r`, rsync -t) would otherwise get the old picture's vectors.
    if isinstance(source, DatasetImage):
        key = source.key  # cached on the object: a hash of the cell's bytes, or "path:..." for a path-only cell
        path = source.raw().get("path") if key.startswith("path:") else None  # (an imagefolder dataset)
        return "file:" + file_digest(Path(path)) if path and os.path.isfile(path) else key
    if isinstance(source, Image.Image):
        # The pixels the model is given (EXIF orientation applied, palette and transparency resolved, RGB), not the
        # stored ones: two images with the same stored bytes but another palette or orientation embed differently.
        seen = load_image(source)
        return "pixels:" + hashlib.sha1(f"{seen.mode}{seen.size}".encode() + seen.tobytes()).hexdigest()
    return "file:" + file_digest(Path(source).expanduser())


def inputs_fingerprint(inputs: Sequence[Any]) -> str:
    """Hex digest of an input list (str texts, image sources, or {"image", "text"} dicts), order included."""
    hasher = hashlib.sha256()
    for item in inputs:
        if isinstance(item, str):
            key = "text:" + item
        elif isinstance(item, dict):
            key = "pair:" + json.dumps({k: _source_key(v) if k == "image" else v for k, v in sorted(item.items())})
        else:
            key = "image:" + _source_key(item)
        hasher.update(hashlib.sha256(key.encode()).digest())
    return hasher.hexdigest()


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, DatasetImage):
        return load_image(source.load())
    return load_image(source)


def _materialise(item: Any, wrap_text: bool) -> Any:
    if isinstance(item, str):
        return {"text": item} if wrap_text else item
    if isinstance(item, dict):
        return {"image": _open(item["image"]), "text": item["text"]}
    return _open(item)


def _call(model: Encoder, inputs: list, batch_size: int, instruction: str | None,
          encode_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    kwargs = dict(encode_kwargs or {})
    if instruction is not None:
        kwargs["instruction"] = instruction
    if hasattr(model, "encode"):
        out = model.encode(inputs, batch_size=batch_size, show_progress_bar=False, **kwargs)
    elif callable(model):
        out = model(inputs, **kwargs)
    else:
        raise TypeError(f"{type(model).__name__} can neither .encode(inputs) nor be called on inputs.")
    out = torch.as_tensor(out).detach().float().cpu()
    if out.ndim != 2 or out.shape[0] != len(inputs):
        raise ValueError(f"The encoder returned shape {tuple(out.shape)} for {len(inputs)} inputs; expected "
                         f"({len(inputs)}, D).")
    return out


def _is_slq(model: Encoder) -> bool:
    from ..modeling.modeling_slq import SLQModel

    return isinstance(model, SLQModel)


def encode_inputs(
    model: Encoder,
    inputs: Sequence[Any],
    *,
    batch_size: int = 16,
    chunk_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    instruction: str | None = None,
    show_progress_bar: bool | None = None,
    desc: str = "encode",
    stats: dict | None = None,
    encode_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Embed ``inputs`` chunk by chunk with a progress bar, reusing / filling the on-disk cache.

    Args:
        model: see the module docstring.
        inputs: texts (str), image sources (path, PIL, :class:`DatasetImage`) or {"image", "text"} dicts.
        batch_size: the model's batch size.
        chunk_size: inputs opened and handed to the model at once (default 8 batches): bounds memory while letting
            the model length-sort within a chunk.
        cache_dir: folder for cached embeddings; None disables the cache.
        model_id: cache identity of the model; by default :func:`model_fingerprint`.
        instruction: passed to ``encode(..., instruction=)`` when given (SLQModel prompt prefix).
        show_progress_bar: None shows it only on an interactive terminal.
        stats: if a dict is given, "seconds" and "cache" ("hit" | "miss" | "off") are written into it.
        encode_kwargs: more keyword arguments for ``model.encode`` / the callable (e.g. sentence-transformers'
            ``truncate_dim=``, ``normalize_embeddings=``, ``prompt_name=``); part of the cache key.

    Returns:
        float32 (N, D) on CPU, in input order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer.")
    inputs = list(inputs)
    started = time.perf_counter()
    cache_path = key = None
    if cache_dir is not None:
        ident = model_id if model_id is not None else model_fingerprint(model)
        settings = [CACHE_VERSION, ident, instruction, encode_kwargs or {}, inputs_fingerprint(inputs)]
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=_json_default).encode())
        key = key.hexdigest()
        try:  # before the encoding: a cache folder that cannot be made fails now, not after the work
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cache_dir {str(cache_dir)!r} (--cache-dir) cannot be used as the embedding cache folder: "
                          f"{err.strerror or err}. Pass a folder that is writable.") from err
        cache_path = Path(cache_dir) / f"{desc.replace(' ', '_')}-{key[:32]}.safetensors"
        cached = _load_cached(cache_path, key, len(inputs))
        if cached is not None:
            if stats is not None:
                stats.update(seconds=time.perf_counter() - started, cache="hit")
            return cached

    from tqdm.auto import tqdm

    # {"text": ...}: a caption that names a file is still a caption (SLQ models, and sentence-transformers models
    # hosting one, whose input rule would otherwise open it as an image)
    wrap_text = isinstance(model, torch.nn.Module) and any(_is_slq(module) for module in model.modules())
    chunk_size = chunk_size or batch_size * 8
    parts = []
    # tqdm's disable=None means "only on a terminal": progress lines would flood log files.
    disable = None if show_progress_bar is None else not show_progress_bar
    with tqdm(total=len(inputs), desc=desc, unit="item", disable=disable) as bar:
        for start in range(0, len(inputs), chunk_size):
            chunk = [_materialise(item, wrap_text) for item in inputs[start : start + chunk_size]]
            parts.append(_call(model, chunk, batch_size, instruction, encode_kwargs))
            bar.update(len(chunk))
    out = torch.cat(parts) if parts else torch.empty(0, 0)
    if not torch.isfinite(out).all():
        raise ValueError(f"{desc}: the model produced NaN/Inf embeddings; check its weights and dtype.")
    if cache_path is not None:
        _save_cached(cache_path, key, out)
    if stats is not None:
        stats.update(seconds=time.perf_counter() - started, cache="miss" if cache_path else "off")
    return out


def _load_cached(path: Path, key: str, count: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensor = handle.get_tensor("embeddings")
    except Exception as err:  # a truncated or foreign file: recompute rather than fail the evaluation
        warnings.warn(f"Ignoring unreadable embedding cache {path} ({err}); recomputing.", stacklevel=3)
        return None
    if meta.get("key") != key or tensor.ndim != 2 or tensor.shape[0] != count:
        warnings.warn(f"Embedding cache {path} does not match its key; recomputing.", stacklevel=3)
        return None
    return tensor.float()


def _save_cached(path: Path, key: str, embeddings: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: an interrupted run never leaves a truncated cache file that looks valid.
    metadata = {"key": key, "count": str(embeddings.shape[0]), "slq_hf_cache": CACHE_VERSION}
    atomic_write(path, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata=metadata))

