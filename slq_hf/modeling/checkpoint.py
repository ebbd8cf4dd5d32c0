"""The SLQ folder format in one place: file and tensor names, validated reads, atomic writes.

An SLQ folder is small: ``config.json`` (``model_type: "slq"``, the pinned backbone), ``model.safetensors`` with
only the trainable tensors (``queries`` (N_q, H), ``logit_scale`` (), optional ``projection.weight`` (D, H) and
``projection.bias`` (D,)), optional named query sets ``query_sets/<name>.safetensors`` (one ``queries`` tensor each)
indexed by ``query_sets/sets.json``, the model code (for ``trust_remote_code``), processor files and the
sentence-transformers files.

Reading: :func:`read_tensors` validates a safetensors file before a single tensor is allocated (it is a safetensors
file and not a pickle, names, shapes and byte sizes from the header, dtype), then checks the values (finite, in
range). Writing: :func:`write_folder` stages a whole folder beside the target and swaps it in with one rename, so a
failed or killed save leaves the previous folder as it was, and :func:`read_folder` lets a reader see one save,
never a mix of two.

Ships inside every checkpoint (remote code): torch, safetensors, the standard library and siblings only.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _save_safetensors_bytes

from .sentence_transformers_files import (
    MODULES_NAME,
    NORMALIZE_DIR,
    SENTENCE_BERT_CONFIG_NAME,
    ST_CONFIG_NAME,
    read_json,
)

T = TypeVar("T")

# ------------------------------------------------------------------------------------------------------ names
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_METADATA = {"format": "pt", "library": "slq_hf"}
QUERY_SETS_DIR = "query_sets"
QUERY_SETS_INDEX = f"{QUERY_SETS_DIR}/sets.json"
QUERY_SET_TENSOR = "queries"
DEFAULT_QUERY_SET = "default"
# The tensors of model.safetensors, with the names of their dimensions (for errors that say what a wrong number means).
DIM_NAMES = {"queries": ("num_queries", "hidden_size"), "logit_scale": (),
             "projection.weight": ("projection_dim", "hidden_size"), "projection.bias": ("projection_dim",)}
SLQ_TENSOR_NAMES = frozenset(DIM_NAMES)
# Names become file names and module keys (no dots there): one plain token.
QUERY_SET_NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # \Z: no trailing newline
# CLIP clamps its learnable logit scale at 100 (temperature >= 0.01) to keep training stable.
MAX_LOGIT_SCALE = math.log(100.0)
# A trained logit_scale may overshoot the clamp by a few optimizer steps (the clamp has no gradient above it, so it
# stays there); values beyond this margin cannot come from training and mean a corrupt file.
LOGIT_SCALE_MARGIN = 0.5
# SLQ tensors are kilobytes to a few hundred MB (a projection head); a header asking for more is not ours.
MAX_TENSOR_BYTES = 2**30

# Code files the save copies from this package, plus the names of files earlier releases shipped, so a re-save drops
# them instead of carrying stale code along.
CODE_FILES = frozenset(p.name for p in Path(__file__).parent.glob("*.py") if p.name != "__init__.py") | {
    "query_sets.py", "safetensors_io.py", "upload.py"}
PROCESSOR_FILES = frozenset({
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt",
})
SENTENCE_TRANSFORMERS_FILES = frozenset({MODULES_NAME, SENTENCE_BERT_CONFIG_NAME, ST_CONFIG_NAME, NORMALIZE_DIR})
# Every top-level entry an SLQ save writes. A re-save replaces these (stale ones, such as a removed query set's
# files, go); every other entry of the old folder (a Trainer's checkpoint-*/, runs/, README.md, user files) is kept.
SLQ_OWNED = frozenset({CONFIG_NAME, WEIGHTS_NAME, QUERY_SETS_DIR}) | CODE_FILES | PROCESSOR_FILES | \
    SENTENCE_TRANSFORMERS_FILES
# Files the writers update rather than rewrite (sentence-transformers writes its config with the user's prompts
# just before it asks the model to save itself): copied into the staging folder before the save writes it.
SEEDED_FILES = (MODULES_NAME, SENTENCE_BERT_CONFIG_NAME, ST_CONFIG_NAME)
# Files that hold (or index) model weights in some framework: a folder holding one is another model's.
WEIGHT_FILE_PATTERNS = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.gguf", "*.ggml", "*.h5", "*.keras", "*.msgpack",
    "*.onnx", "*.onnx_data", "*.tflite", "*.npz", "*.npy", "*.safetensors", "*.index.json", "*.mlmodel",
)
# Pickles transformers' Trainer writes next to a saved model: run state, not weights.
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")

# safetensors dtype -> torch dtype of the tensors SLQ loads. float64 is exact in, rounded to float32 on load;
# float8/float4, integers and bools never held SLQ parameters.
LOADABLE_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

Dim = int | range | None  # exact size, allowed sizes, or any size (bounded by MAX_TENSOR_BYTES)


class CheckpointError(ValueError):
    """A checkpoint file or folder is unreadable, not SLQ's, or not safe to write; the message starts with the path
    and says what to do."""


def query_set_file(name: str) -> str:
    """Relative path of query set ``name`` inside an SLQ folder: ``query_sets/<name>.safetensors``."""
    return f"{QUERY_SETS_DIR}/{check_query_set_name(name)}.safetensors"


def check_query_set_name(name: Any) -> str:
    """Return ``name`` if it can name a query set (a file name and a module key), else raise ValueError."""
    if not isinstance(name, str) or not QUERY_SET_NAME_PATTERN.match(name):
        raise ValueError(f"Query set name {name!r} is invalid; use 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it becomes a file name).")
    return name


def expected_tensors(num_queries: int, hidden_size: int, projection_dim: int | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in an SLQ ``model.safetensors`` for this config."""
    shapes: dict[str, tuple[int, ...]] = {"queries": (num_queries, hidden_size), "logit_scale": ()}
    if projection_dim:
        shapes.update({"projection.weight": (projection_dim, hidden_size), "projection.bias": (projection_dim,)})
    return shapes


# --------------------------------------------------------------------------------------------------- reading
@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """safetensors' own reader on ``path``. It checks the header before any tensor is read (its size, the JSON, known
    dtypes, offsets that cover the data block exactly) and maps the file once, so the header and the data read
    through it come from one file even if the path is replaced meanwhile."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err}).") from err
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}). Only safetensors are loaded: a "
                              "pickle file or a truncated download ends up here; re-download the file or re-save "
                              "the model.") from None


def _entries(handle: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    slices = {name: handle.get_slice(name) for name in handle.keys()}
    return {name: (piece.get_dtype(), tuple(piece.get_shape())) for name, piece in slices.items()}


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(name -> (safetensors dtype, shape), metadata) of a safetensors file, read without allocating any tensor.

    Raises CheckpointError when the file is not a well-formed safetensors file (a pickle, truncated, sizes that do not
    add up).
    """
    with _open(Path(path)) as handle:
        return _entries(handle), handle.metadata() or {}


def _fits(shape: tuple[int, ...], expected: tuple[Dim, ...]) -> bool:
    return len(shape) == len(expected) and all(e is None or (n in e if isinstance(e, range) else n == e)
                                               for n, e in zip(shape, expected))


def _dim_text(dim: Dim) -> str:
    return "any" if dim is None else f"{dim.start}..{dim.stop - 1}" if isinstance(dim, range) else str(dim)


def _describe(expected: tuple[Dim, ...]) -> str:
    parts = [_dim_text(e) for e in expected]
    return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"


def _shape_problem(name: str, shape: tuple[int, ...], expected: tuple[Dim, ...]) -> str:
    labels = DIM_NAMES.get(name)
    if labels and len(labels) == len(expected) and len(shape) != len(expected):
        return (f"tensor {name!r} has shape {shape}, expected a ({', '.join(labels)}) tensor of shape "
                f"{_describe(expected)}")
    if labels and len(shape) == len(expected) and labels[-1] == "hidden_size" and not _fits(shape[-1:], expected[-1:]):
        return (f"tensor {name!r} has shape {shape}: it is {shape[-1]} wide but the backbone has hidden size "
                f"{_dim_text(expected[-1])}. It was trained for a different backbone; load it with the "
                "backbone it was trained on")
    named = f" ({', '.join(labels)} from config.json and the backbone)" if labels else ""
    return f"tensor {name!r} has shape {shape}, expected {_describe(expected)}{named}"


def read_tensors(path: str | os.PathLike, expected: Mapping[str, tuple[Dim, ...] | None], *,
                 optional: Iterable[str] = (), max_bytes: int = MAX_TENSOR_BYTES) -> dict[str, torch.Tensor]:
    """Read the tensors of an SLQ safetensors file, validated; float32 CPU tensors out.

    Checked from the header before anything is allocated: the file is safetensors (never unpickled), its tensor names
    are exactly ``expected`` (those in ``optional`` may be absent), every shape fits, the dtype is float32, float16,
    bfloat16 or float64, and the total size is at most ``max_bytes``. Then the values: finite, and ``logit_scale``
    within the clamp (``MAX_LOGIT_SCALE``).

    Args:
        path: the safetensors file.
        expected: name -> shape, each dimension an int (exact), a ``range`` (allowed sizes) or None (any size);
            a shape of None accepts any shape.
        optional: names that may be missing.
        max_bytes: refuse files whose tensors would take more than this many bytes.

    Raises:
        CheckpointError: naming the file, the tensor and what to do.
    """
    path, optional = Path(path), set(optional)
    with _open(path) as handle:
        header = _entries(handle)
        missing = sorted(set(expected) - set(header) - optional)
        unexpected = sorted(set(header) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: expected tensors {sorted(expected)}; missing {missing}, unexpected "
                                  f"{unexpected}. Is this an SLQ checkpoint with the same config?")
        for name, (dtype, shape) in header.items():
            want = expected[name]
            if want is not None and not _fits(shape, tuple(want)):
                raise CheckpointError(f"{path}: {_shape_problem(name, shape, tuple(want))}.")
            if dtype not in LOADABLE_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; SLQ tensors are float32, "
                                      "float16, bfloat16 or float64. Convert the file (e.g. tensor.float()) and save "
                                      "it again.")
        total = sum(math.prod(shape) * LOADABLE_DTYPES[dtype].itemsize for dtype, shape in header.values())
        if total > max_bytes:
            raise CheckpointError(f"{path}: the tensors would take {total / 2**20:.0f} MiB, more than the "
                                  f"{max_bytes / 2**20:.0f} MiB an SLQ checkpoint can need; the file is not SLQ's.")
        state = {name: handle.get_tensor(name) for name in header}
    out = {}
    for name, tensor in state.items():
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf values; the checkpoint is corrupt (or "
                                  "training diverged). Use an earlier checkpoint.")
        out[name] = tensor.contiguous()
    # logit_scale (log 1/temperature) within the clamp the loss applies (|value| <= log 100), plus a small margin for
    # trained values that overshot the clamp; finite, as every tensor is by now.
    number = float(out.get("logit_scale", 0.0))
    if abs(number) > MAX_LOGIT_SCALE + LOGIT_SCALE_MARGIN:
        raise CheckpointError(f"{path}: logit_scale is {number} (temperature {math.exp(-number):.3g}) but it must "
                              f"lie within +-log(100) = {MAX_LOGIT_SCALE:.3f} (temperature 0.01..100); the checkpoint "
                              "is corrupt. Use an earlier checkpoint.")
    return out


def read_query_set_index(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``query_sets/sets.json``: ``{"active": name, "sets": {name: {"file", "num_queries"}}}``.

    Every set name is a valid name other than ``"default"`` (which lives in model.safetensors), every file is
    ``query_sets/<name>.safetensors`` (nothing outside the folder), ``num_queries`` a positive int when given, and
    ``active`` is ``"default"`` or a listed set. Raises CheckpointError naming the file.
    """
    path = Path(path)

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}. This query-set index is damaged; re-save the model, or delete "
                               f"the {QUERY_SETS_DIR}/ folder to load the default set only.")

    try:
        index = json.loads(path.read_text(encoding="utf8"))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err}).") from err
    except (UnicodeDecodeError, ValueError) as err:
        raise bad(f"not valid JSON ({err})") from None
    if not isinstance(index, dict) or not isinstance(index.get("sets"), dict):
        raise bad('expected an object {"active": ..., "sets": {...}}')
    sets = {}
    for name, entry in index["sets"].items():
        if not QUERY_SET_NAME_PATTERN.match(name) or name == DEFAULT_QUERY_SET:  # JSON keys are str
            raise bad(f"set name {name!r} is invalid (1-64 letters, digits, '_' or '-'; 'default' is the set in "
                      f"{WEIGHTS_NAME})")
        if same := [n for n in sets if n.casefold() == name.casefold()]:  # one file on macOS / Windows
            raise bad(f"sets {same[0]!r} and {name!r} differ only in case")
        entry = entry if isinstance(entry, dict) else {}
        file = entry.get("file", expected := query_set_file(name))
        if file != expected:
            raise bad(f"set {name!r} points at {file!r}; sets live at {expected!r}")
        count = entry.get("num_queries")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise bad(f"set {name!r} has num_queries={count!r}; expected a positive integer")
        sets[name] = {"file": file, "num_queries": count}
    active = index.get("active", DEFAULT_QUERY_SET)
    if not isinstance(active, str) or (active != DEFAULT_QUERY_SET and active not in sets):
        raise bad(f"the active set {active!r} is not one of {[DEFAULT_QUERY_SET, *sets]}")
    return {"active": active, "sets": sets}


# ----------------------------------------------------------------------------------------- config vs backbone
# Config attributes of special-token ids that are not structure-bearing for the prompt: any id may share them.
_PLAIN_ID_ATTRS = frozenset({"pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id",
                             "decoder_start_token_id"})


def special_token_ids(backbone_config: Any) -> set[int]:
    """Ids that mean structure to the backbone (image/video/vision markers...): every ``*_token_id`` /
    ``*_token_index`` attribute of the backbone config and its text config, except pad/bos/eos/unk/sep."""
    ids: set[int] = set()
    text = backbone_config.get_text_config()
    for config in {id(backbone_config): backbone_config, id(text): text}.values():
        for key, value in vars(config).items():
            if key.endswith(("_token_id", "_token_index")) and key not in _PLAIN_ID_ATTRS:
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(item, int) and not isinstance(item, bool):
                        ids.add(item)
    return ids


def position_budget(backbone_config: Any) -> int | None:
    """Positions the backbone's language model accepts (``max_position_embeddings``), or None when unknown."""
    for config in (backbone_config.get_text_config(), backbone_config):
        value = getattr(config, "max_position_embeddings", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_queries(backbone_config: Any) -> int | None:
    """Largest number of queries a set may have on this backbone: its positions minus one for the prompt."""
    budget = position_budget(backbone_config)
    return None if budget is None else budget - 1


def check_config_for_backbone(config: Any, backbone_config: Any, vocab_size: int | None = None,
                              source: Any = "SLQConfig") -> None:
    """Validate the config fields that size or index something against the backbone, before anything is allocated.

    - ``num_queries`` leaves room for a prompt within the backbone's positions (``max_position_embeddings``);
    - ``hidden_size`` (when set) equals the backbone's width;
    - a ``projection_size`` head fits the checkpoint size limit (``MAX_TENSOR_BYTES``);
    - ``placeholder_token_id`` (when set) is inside the vocabulary and not a special (image/video/vision) token.

    Args:
        config: an SLQConfig (duck-typed: ``num_queries``, ``hidden_size``, ``placeholder_token_id``).
        backbone_config: the backbone's config.
        vocab_size: rows of the backbone's input embedding (default: the text config's ``vocab_size``).
        source: what to name in errors (e.g. the folder's config.json).

    Raises:
        CheckpointError.
    """
    text, limit = backbone_config.get_text_config(), max_queries(backbone_config)
    if limit is not None and config.num_queries > limit:
        raise CheckpointError(f"{source}: num_queries={config.num_queries} but the backbone accepts "
                              f"{limit + 1} positions, so at most {limit} queries fit after a prompt; the config is "
                              "wrong or was written for another backbone.")
    width = getattr(text, "hidden_size", None)
    if config.hidden_size is not None and isinstance(width, int) and config.hidden_size != width:
        raise CheckpointError(f"{source}: hidden_size={config.hidden_size} but the backbone embeds tokens in {width} "
                              "dimensions; queries trained on one backbone cannot run on another.")
    head = (getattr(config, "projection_size", None) or 0) * (width if isinstance(width, int) else 0) * 4
    if head > MAX_TENSOR_BYTES:  # float32 (projection_size, hidden_size): it could never be saved and loaded again
        raise CheckpointError(f"{source}: projection_size={config.projection_size} makes a {head / 2**20:.0f} MiB "
                              f"head on this {width}-wide backbone, more than the {MAX_TENSOR_BYTES // 2**20} MiB "
                              "an SLQ checkpoint may hold; pick a smaller projection_dim.")
    token = config.placeholder_token_id
    if token is None:
        return
    vocab = vocab_size if vocab_size is not None else getattr(text, "vocab_size", None)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (vocab is not None and token >= vocab):
        raise CheckpointError(f"{source}: placeholder_token_id={token!r} is not a token id of the backbone "
                              f"(vocabulary 0..{vocab - 1 if vocab else '?'}); remove it from config.json to let SLQ "
                              "pick one.")
    if token in (special := special_token_ids(backbone_config)):
        raise CheckpointError(f"{source}: placeholder_token_id={token} is one of the backbone's special tokens "
                              f"{sorted(special)} (image/video markers), which the "
                              "backbone treats as structure; remove it from config.json to let SLQ pick one.")


# --------------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    with suppress(OSError):  # platforms without directory handles (Windows), file systems that cannot fsync one
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path`` (one per process and thread, so concurrent writers never
    share one), which is then renamed over ``path``: a reader sees the old file or the new one, never part of one,
    and a failed write leaves the old file untouched. The temporary file never outlives the call. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_tensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` as a byte-reproducible safetensors file, atomically (temporary file, fsync, rename).

    A crash never leaves a half-written file under the final name, and a failed write (disk full) leaves the old file
    untouched. Tensors are written as given (contiguous CPU copies are made).

    Byte-reproducible: safetensors serialises its header from a hash map whose order changes between processes, so
    two saves of the same tensors would differ byte-wise; the JSON header's keys are sorted, so a file's hash depends
    on its content only (uploads, caches and tests compare bytes). Data offsets are absolute within the data block,
    so the data block is unchanged.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    blob = _save_safetensors_bytes(tensors, metadata=dict(metadata) if metadata is not None else None)
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header + blob[8 + length :])
            handle.flush()
            # On disk before the rename, so even a power loss cannot leave the new name on partial data.
            os.fsync(handle.fileno())

    atomic_write(path, write)
    _fsync_dir(path.parent)


def check_query_set_target(path: str | os.PathLike) -> None:
    """Refuse, before anything is written, to write a query-set file over a file that is not one (an SLQ folder's
    model.safetensors or config.json, a backbone's weights...): the write would destroy it.

    Raises:
        CheckpointError naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        names = set(read_header(path)[0])
    except CheckpointError:
        names = set()
    if names != {QUERY_SET_TENSOR}:
        what = f"a safetensors file holding {sorted(names)[:3]}" if names else "not a query-set file"
        raise CheckpointError(f"{path}: exists and is {what}; writing a query set there would destroy it. Nothing "
                              "was written. Save the set under another file name (e.g. <name>.safetensors).")


def check_save_target(path: str | os.PathLike) -> None:
    """Refuse, before anything is written, to save an SLQ model into a folder that holds another model.

    Fine: a new or empty folder, an SLQ folder (re-save), a folder of unrelated files (a Trainer's ``checkpoint-*``
    dirs, SLQ query-set files). Refused: a file, a folder with a ``config.json`` of another model type or with the
    ``modules.json`` of another sentence-transformers model, or weight files that are not SLQ's (a backbone, ...).

    Raises:
        CheckpointError naming the folder, what in it belongs to another model and what to do.
    """
    path, found = Path(path), []  # found: what in the folder belongs to another model, as readable descriptions
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a folder; an SLQ model saves into a folder. Pick another path.")
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf8"))
        readable, model_type = True, data.get("model_type") if isinstance(data, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        readable, model_type = False, None
    is_slq = readable and model_type == "slq"
    if (path / CONFIG_NAME).exists() and not is_slq:
        found.append(f"{CONFIG_NAME} of a {model_type!r} model" if readable else f"{CONFIG_NAME} (not SLQ's JSON)")
    modules = read_json(path / MODULES_NAME)  # SLQ's first module is a Transformer in the folder root
    first = modules[0] if isinstance(modules, list) and modules else None
    if not is_slq and isinstance(first, dict) and first.get("path"):
        found.append(f"{MODULES_NAME} of a sentence-transformers model (its {first['path']}/)")
    for entry in sorted(path.iterdir()):
        if not entry.is_file() or any(fnmatch.fnmatch(entry.name, p) for p in TRAINER_FILES):
            continue
        if entry.suffix == ".safetensors":  # SLQ's own: model.safetensors, or a query-set file (save_query_set)
            try:
                names = set(read_header(entry)[0])
            except CheckpointError:
                if not (is_slq and entry.name == WEIGHTS_NAME):  # an SLQ folder's damaged weights may be replaced
                    found.append(f"{entry.name} (unreadable, not known to be SLQ's)")
                continue
            if not names <= SLQ_TENSOR_NAMES or "queries" not in names:
                found.append(f"{entry.name} holding {sorted(names - SLQ_TENSOR_NAMES)[:3] or sorted(names)[:3]}...")
        elif any(fnmatch.fnmatch(entry.name, pattern) for pattern in WEIGHT_FILE_PATTERNS):
            found.append(f"{entry.name} (weights)")
    if found:
        raise CheckpointError(
            f"{path}: refusing to save an SLQ model here: this folder holds another model ({'; '.join(found)}), and "
            "saving would overwrite its files. Nothing was written. Save into a new folder (or an existing SLQ "
            "folder); if this is the backbone's folder, the SLQ folder only needs to point at it.")


# A folder swap in one system call (Linux >= 3.15, glibc >= 2.28); other systems use two renames.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_STAGING, _ASIDE = "slq-staging", "slq-old"


def _short(target: Path) -> str:
    """The target's name as it starts the names of its staging and set-aside folders; a long one is cut (and told
    apart by a hash), so that with their suffix they stay within the file systems' 255-byte limit for a name."""
    raw = target.name.encode()
    if len(raw) <= 150:
        return target.name
    return f"{raw[:140].decode(errors='ignore')}-{hashlib.sha1(raw).hexdigest()[:8]}"


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; False when the system cannot (then nothing changed)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # file systems without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put folder ``new`` at ``target`` (same file system), replacing what is there in one step; the old folder is
    deleted afterwards. A reader sees the old folder or the new one, never a mix; a crash leaves one of them at
    ``target`` (or, on systems without an atomic exchange, the old one beside it, restored by the next save)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        _fsync_dir(target.parent)
        return
    if _exchange(new, target):
        old = new
    else:
        old = target.with_name(f".{_short(target)}.{_ASIDE}-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        pass
    return True


def _clean_leftovers(target: Path) -> None:
    """Remove what saves killed midway left beside ``target`` (their processes are gone), and put back a folder a
    killed two-rename swap moved aside."""
    pattern = re.compile(rf"^\.{re.escape(_short(target))}\.({_STAGING}|{_ASIDE})-(\d+)-")
    for entry in sorted(target.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == _ASIDE and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _link_tree(source: Path, dest: Path) -> None:
    """Recreate ``source`` at ``dest`` with hard links (no data copied; the old folder stays intact), copying files
    where the file system cannot link. A mount point inside the folder is refused: its content would be copied, and
    then deleted from the mounted file system with the old folder."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        if os.path.ismount(source):
            raise _mounted(source)
        dest.mkdir()
        for child in source.iterdir():
            _link_tree(child, dest / child.name)
        # After the children, which would set its mtime to now (the Trainer rotates checkpoints by mtime) and which a
        # read-only mode would refuse.
        shutil.copystat(source, dest)
    else:
        try:
            os.link(source, dest)
        except OSError as err:
            if err.errno == errno.EXDEV:  # a bind mount (ismount cannot see one of the same file system)
                raise _mounted(source) from None
            shutil.copy2(source, dest)


def _mounted(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: is (on) a mount point inside the folder being saved; the save replaces the "
                           "folder, which would empty that file system. Nothing was written. Unmount it, or save "
                           "into another folder.")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def write_folder(target: str | os.PathLike, write: Callable[[Path], None], replace_all: bool = False) -> Path:
    """Save a whole SLQ folder atomically: ``write(staging)`` fills a fresh folder beside ``target``, then it is
    swapped in with one rename.

    Before anything is written, :func:`check_save_target` refuses a folder holding another model. The files in
    ``SEEDED_FILES`` are copied from the old folder into the staging folder first (writers that update them see the old
    values). After ``write``, entries of the old folder that the save did not write and that SLQ does not own
    (``SLQ_OWNED``) are carried over as hard links: a Trainer's ``checkpoint-*/``, ``runs/``, README.md, user files.
    ``replace_all=True`` (an export replacing an earlier export) seeds and carries over nothing. A failure at any
    point (exception, disk full, the process killed) leaves the previous folder untouched.

    Returns:
        The resolved target path.
    """
    target = Path(os.path.realpath(target))
    check_save_target(target)
    if os.path.ismount(target):  # a mount point cannot be renamed: the swap would fail after all the writing
        raise CheckpointError(f"{target}: is a mount point, which cannot be replaced in one step; save into a "
                              f"subfolder of it (e.g. {target}/model). Nothing was written.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{_short(target)}.{_STAGING}-{os.getpid()}-", dir=target.parent))
    except OSError as err:
        raise CheckpointError(f"{target}: cannot create a staging folder beside it ({err.strerror or err}); an atomic "
                              "save needs write access to the parent folder. Save somewhere writable.") from err
    old = target if target.is_dir() and not replace_all else None
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, (old.stat().st_mode & 0o7777) if old else 0o777 & ~umask)
        for name in SEEDED_FILES if old else ():
            if (old / name).is_file():
                shutil.copy2(old / name, staging / name)
        write(staging)
        if old:
            for entry in old.iterdir():
                # Temporary files of interrupted per-file writes are debris, not user data.
                debris = entry.name.startswith(".") and ".tmp-" in entry.name
                if entry.name not in SLQ_OWNED and not debris and not os.path.lexists(staging / entry.name):
                    _link_tree(entry, staging / entry.name)
        _fsync_tree(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cwd and (cwd == str(target) or cwd.startswith(str(target) + os.sep)):
        # The process's working directory was in the old folder: move to the same place in the new one, or to the
        # folder itself when that place is gone (a removed query_sets/).
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir(target)
    return target


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def read_folder(folder: str | os.PathLike, read: Callable[[], T], *, attempts: int = 10) -> T:
    """Run ``read()`` (which reads files of ``folder``) so that what it read comes from one save of the folder.

    :func:`write_folder` swaps a new folder in with one rename; a reader that opened ``config.json`` of the old folder
    and ``model.safetensors`` of the new one would pair them. The folder's identity (inode, change time) is taken
    before and after ``read()``: when it changed, or ``read()`` failed while it changed, the read is repeated. A
    ``folder`` that is not a local folder (a Hub id) is read once.

    Raises:
        whatever ``read()`` raised when the folder did not change meanwhile; CheckpointError when it kept changing.
    """
    path = Path(folder)
    if not path.is_dir():
        return read()
    for attempt in range(attempts):
        before = _identity(path)
        try:
            result = read()
        except Exception:
            if before is not None and _identity(path) == before:
                raise
        else:
            if before is not None and _identity(path) == before:
                return result
        time.sleep(0.01 * (attempt + 1))  # a swap in progress (two-rename fallback) takes microseconds
    raise CheckpointError(f"{path}: the folder was re-saved {attempts} times while it was being read; load it again "
                          "when the saves are done.")
