"""Which files of an SLQ folder may go to the Hub, and the upload itself (huggingface_hub).

An SLQ checkpoint is a few hundred KB of queries plus config, code and processor files. The frozen backbone stays
in its own repository: pushing a copy of its weights would be a licence problem and gigabytes of waste. Everything
that uploads SLQ folders (``SLQModel.push_to_hub``, ``slq-hf push``) goes through :func:`upload_slq_folder`, which
refuses any file that looks like model weights other than the queries-only ``model.safetensors``.

Ships inside every checkpoint (remote code): imports only safetensors, huggingface_hub and the standard library.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "model.safetensors"
# Every tensor an SLQ model.safetensors may hold (queries, learnable temperature, optional head).
SLQ_TENSOR_NAMES = frozenset({"queries", "logit_scale", "projection.weight", "projection.bias"})
# File names that hold (or index) model weights in some framework. Pickle formats are also a code-execution risk.
WEIGHT_FILE_PATTERNS = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.gguf", "*.ggml", "*.h5", "*.keras", "*.msgpack",
    "*.onnx", "*.onnx_data", "*.tflite", "*.npz", "*.npy", "*.safetensors", "*.index.json", "*.mlmodel",
)
# Extra query sets written by SLQModel.save_pretrained (query_sets.py): one (N_q, H) "queries" tensor each.
QUERY_SET_PATTERN = "query_sets/*.safetensors"
# An SLQ folder is megabytes (the largest part is usually tokenizer.json); anything this big is not ours.
MAX_FILE_BYTES = 256 * 2**20


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err}); refusing to upload it.") from err


def collect_upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of an SLQ folder that would be uploaded, as sorted POSIX paths relative to ``folder``.

    Hidden files and folders (``.git``, ``.cache``) are skipped. Raises ``ValueError`` listing every file that looks
    like backbone weights: any weight-format file other than ``model.safetensors``, a ``model.safetensors`` holding
    tensors that are not SLQ's (``queries``, ``logit_scale``, ``projection.*``), or any file over 256 MiB. Extra query
    sets (``query_sets/<name>.safetensors``) go up when they hold only a ``queries`` tensor.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; expected an SLQ folder (save_pretrained or `slq-hf export`).")
    files, refused = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        name = rel.as_posix()
        size = path.stat().st_size
        if name == WEIGHTS_NAME:
            keys = _safetensors_keys(path)
            foreign = sorted(set(keys) - SLQ_TENSOR_NAMES)
            if foreign or "queries" not in keys:
                refused.append(f"{name} (holds tensors {foreign[:3] or keys[:3]}..., not SLQ queries)")
                continue
        elif fnmatch.fnmatch(name, QUERY_SET_PATTERN):
            keys = _safetensors_keys(path)
            if keys != ["queries"]:
                refused.append(f"{name} (holds tensors {keys[:3]}..., a query set holds only 'queries')")
                continue
        elif any(fnmatch.fnmatch(path.name, pattern) for pattern in WEIGHT_FILE_PATTERNS):
            refused.append(f"{name} (a weights file)")
            continue
        if size > MAX_FILE_BYTES:
            refused.append(f"{name} ({size / 2**20:.0f} MiB)")
            continue
        files.append(name)
    if refused:
        raise ValueError(
            f"{root}: refusing to upload {refused}. An SLQ repository holds only the queries ({WEIGHTS_NAME} with "
            f"tensors {sorted(SLQ_TENSOR_NAMES)}), config, code and processor files; the backbone's weights stay in "
            "the backbone's own repository. Remove these files or export a clean folder with `slq-hf export`."
        )
    if WEIGHTS_NAME not in files or "config.json" not in files:
        raise ValueError(f"{root}: no {WEIGHTS_NAME} and config.json; this is not an SLQ folder.")
    return files


def upload_slq_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> Any:
    """Create ``repo_id`` if needed and commit exactly the files :func:`collect_upload_files` allows.

    Returns huggingface_hub's ``CommitInfo`` (a ``str`` holding the commit URL).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(folder)
    files = collect_upload_files(root)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    # One explicit operation per allowed file (not upload_folder + patterns): what is listed is what goes up.
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in files]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload SLQ model (queries only)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )


def remote_has_readme(repo_id: str, token: bool | str | None = None, revision: str | None = None) -> bool:
    """Whether the Hub repo already has a README.md (an existing model card is never overwritten by a default one)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).file_exists(repo_id, "README.md", revision=revision, repo_type="model")


def default_model_card(config: Any, repo_id: str, tags: list[str] | None = None) -> str:
    """A short model card for ``push_to_hub``; ``slq-hf export`` renders the full one (with evaluation results)."""
    from huggingface_hub import ModelCard, ModelCardData

    backbone = config.backbone_name_or_path
    card_tags = ["slq", "sentence-transformers", "multimodal-embedding", *(tags or [])]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction",
        base_model=backbone if backbone and not os.path.isabs(backbone) else None,
        tags=list(dict.fromkeys(card_tags)),
    )
    revision = f" (revision `{config.backbone_revision}`)" if config.backbone_revision else ""
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

An SLQ (Shared Latent Queries, arXiv 2604.13710) embedding model: {config.num_queries} trained latent queries on the
frozen backbone `{backbone}`{revision}. This repository holds only the queries; the backbone is downloaded from its
own repository when the model loads.

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
embeddings = model.encode(["a photo of a cat", "cat.jpg"])
```

No evaluation results were provided with this upload. A full model card (training details, evaluation table) is made
by `slq-hf export DIR --out HUB_DIR --eval-results results.json` followed by `slq-hf push HUB_DIR --repo-id ...`.
"""
    return str(ModelCard(content))
