"""Uploading SLQ folders to the Hub (huggingface_hub), with the guard that no backbone weights go up.

An SLQ checkpoint is a few hundred KB of queries plus config, code and processor files. The frozen backbone stays
in its own repository: pushing a copy of its weights would be a licence problem and gigabytes of waste, so
:func:`collect_upload_files` refuses any file that looks like model weights other than the queries-only
``model.safetensors`` (and ``query_sets/*.safetensors``), before any network call.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from pathlib import Path
from typing import Any

from ..modeling import checkpoint as ckpt

README_NAME = "README.md"
# An SLQ folder is megabytes (the largest part is usually tokenizer.json); anything this big is not ours.
MAX_FILE_BYTES = 256 * 2**20
# Leading bytes of the files weights are stored in, whatever the file is called (a renamed or backed-up shard, e.g.
# "model.safetensors.bak" or "weights.dat"): pickle protocols 2-5 (torch.save's old format, .bin), zip (torch.save,
# .npz, .keras), GGUF, HDF5 (.h5), NumPy arrays. safetensors has no magic; _is_safetensors reads its header.
WEIGHT_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04", b"GGUF", b"\x89HDF\r\n\x1a\n",
                 b"\x93NUMPY")


def _is_safetensors(head: bytes, size: int) -> bool:
    """True when ``head`` (a file's first bytes) starts like a safetensors file: an 8-byte little-endian header length
    that fits the file, then a JSON object."""
    if len(head) < 9:
        return False
    header_bytes = int.from_bytes(head[:8], "little")
    return 2 <= header_bytes <= size - 8 and head[8:9] == b"{"


def _looks_like_weights(path: Path, size: int) -> bool:
    """Whether the file's content is in a weights format (by its leading bytes, not its name)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    return head.startswith(WEIGHT_MAGICS) or _is_safetensors(head, size)


def _refusal(root: Path, name: str, size: int) -> str | None:
    """Why ``name`` may not be uploaded, or None when it may."""
    if name == ckpt.WEIGHTS_NAME or fnmatch.fnmatch(name, f"{ckpt.QUERY_SETS_DIR}/*.safetensors"):
        allowed = ckpt.SLQ_TENSOR_NAMES if name == ckpt.WEIGHTS_NAME else {ckpt.QUERY_SET_TENSOR}
        try:
            keys = sorted(ckpt.read_header(root / name)[0])
        except ValueError as err:
            return f"{name} (unreadable: {err})"
        if set(keys) - allowed or ckpt.QUERY_SET_TENSOR not in keys:
            return f"{name} (holds tensors {keys[:3]}..., not SLQ queries)"
    elif any(fnmatch.fnmatch(Path(name).name, pattern) for pattern in ckpt.WEIGHT_FILE_PATTERNS):
        return f"{name} (a weights file)"
    elif _looks_like_weights(root / name, size):
        return f"{name} (holds weights in a safetensors/pickle/zip/GGUF/HDF5/NumPy format under another name)"
    if size > MAX_FILE_BYTES:
        return f"{name} ({size / 2**20:.0f} MiB)"
    return None


def collect_upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of an SLQ folder that would be uploaded, as sorted POSIX paths relative to ``folder``.

    Hidden files and folders (``.git``, ``.cache``) are skipped. Raises ``ValueError`` listing every file that looks
    like backbone weights: any weight-format file other than ``model.safetensors`` (by name, or by content under
    another name: a renamed or backed-up shard), a ``model.safetensors`` holding
    tensors that are not SLQ's (``queries``, ``logit_scale``, ``projection.*``), a query set holding more than
    ``queries``, or any file over 256 MiB.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; expected an SLQ folder (save_pretrained or `slq-hf export`).")
    files, refused = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        problem = _refusal(root, rel.as_posix(), path.stat().st_size)
        (refused if problem else files).append(problem or rel.as_posix())
    if refused:
        raise ValueError(f"{root}: refusing to upload {refused}. An SLQ repository holds only the queries "
                         f"({ckpt.WEIGHTS_NAME} with tensors {sorted(ckpt.SLQ_TENSOR_NAMES)}), config, code and "
                         "processor files; the backbone's weights stay in the backbone's own repository. Remove these "
                         "files or export a clean folder with `slq-hf export`.")
    if ckpt.WEIGHTS_NAME not in files or ckpt.CONFIG_NAME not in files:
        raise ValueError(f"{root}: no {ckpt.WEIGHTS_NAME} and {ckpt.CONFIG_NAME}; this is not an SLQ folder.")
    return files


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it as a model repository id, else ValueError naming it (before any work)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is invalid (--repo-id); expected 'org/name' ({err}).") from err
    return repo_id


def push(hub_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: bool | str | None = None,
         revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
         commit_description: str | None = None) -> Any:
    """Upload a folder made by ``slq-hf export`` to ``repo_id`` (created if missing) in one commit of exactly the
    files :func:`collect_upload_files` allows; returns huggingface_hub's ``CommitInfo`` (a ``str``, the commit URL).
    Warns when the folder has no model card or the card's usage snippets load another repository."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    root = Path(hub_dir)
    files = collect_upload_files(root)
    if README_NAME not in files:
        warnings.warn(f"{root} has no {README_NAME}: the repository will have no model card. Make the folder with "
                      "`slq-hf export` to get one.", UserWarning, stacklevel=2)
    elif f'"{repo_id}"' not in (root / README_NAME).read_text(encoding="utf-8", errors="replace"):
        warnings.warn(f"The model card's usage snippets do not load {repo_id!r}; re-export with --repo-id "
                      f"{repo_id} so they do.", UserWarning, stacklevel=2)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    # One explicit operation per allowed file (not upload_folder + patterns): what is listed is what goes up.
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in files]
    return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload SLQ model (queries only)",
                             commit_description=commit_description, revision=revision, create_pr=create_pr,
                             repo_type="model")
