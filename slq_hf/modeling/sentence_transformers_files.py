"""The sentence-transformers files of an SLQ folder: JSON only, no sentence_transformers import.

``SLQModel.save_pretrained`` calls :func:`write_sentence_transformers_files`, so every SLQ folder is also a
sentence-transformers 6.x model: ``SentenceTransformer(folder, trust_remote_code=True)`` loads it with no extra step.
The pipeline is two stock modules:

- ``Transformer`` (saved in the folder root) loads ``AutoModel`` = ``SLQModel`` through ``auto_map`` and calls its
  ``forward`` for every modality; ``pooler_output`` becomes ``sentence_embedding``. Every input (text, image, image
  path, ``{"image", "text"}`` dict, chat messages) is turned into chat messages ("message" modality, structured
  format), rendered with the backbone's chat template plus the generation prompt: the same prompt
  ``SLQModel.encode`` builds.
- ``Normalize``: a no-op when ``SLQConfig.normalize`` is set, and the usual unit-length contract otherwise.

Ships inside every checkpoint with the rest of ``slq_hf/modeling``: standard library only.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

MODULES_NAME = "modules.json"
SENTENCE_BERT_CONFIG_NAME = "sentence_bert_config.json"
ST_CONFIG_NAME = "config_sentence_transformers.json"
NORMALIZE_DIR = "1_Normalize"

TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"

_FORWARD = {"method": "forward", "method_output_name": "pooler_output"}
# "image+text" is how sentence-transformers spells the ("image", "text") tuple key in JSON. With the "message" entry
# present, sentence-transformers converts every other modality to chat messages before calling the processor.
MODALITY_CONFIG: dict[str, dict[str, str]] = {**{m: dict(_FORWARD) for m in ("text", "image", "image+text")},
                                              "message": {**_FORWARD, "format": "structured"}}

# What the Transformer module needs to reproduce SLQ's prompts and per-row layout. add_generation_prompt: the queries
# follow the assistant header, as in the paper. unpad_inputs false: flash-attention unpadding would break the per-row
# left re-lay SLQModel does.
REQUIRED_SENTENCE_BERT_CONFIG: dict[str, Any] = {
    "transformer_task": "feature-extraction",
    "modality_config": MODALITY_CONFIG,
    "module_output_name": "sentence_embedding",
    "unpad_inputs": False,
}
DEFAULT_PROCESSING_KWARGS: dict[str, Any] = {"chat_template": {"add_generation_prompt": True}}

# The paper trains with no instruction, so both prompts are empty and encode_query/encode_document give the same
# prompt as encode (sentence-transformers renders a non-empty prompt as a system message). The entries still exist so
# encode_query/encode_document find them and pass task="query"/"document" to SLQModel.forward.
DEFAULT_PROMPTS: dict[str, str] = {"query": "", "document": ""}

# Forward keyword arguments sentence-transformers hands to the Transformer module (and so to SLQModel.forward).
TRANSFORMER_KWARGS = ["task"]

ST_REQUIREMENTS: dict[str, Any] = {
    "sentence_transformers": {
        "specifier": ">=6.0",
        "reason": "SLQ folders use the multimodal Transformer module (modality_config, chat messages) of 6.x.",
    }
}


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not valid JSON (then it is rewritten from scratch)."""
    try:
        with open(path, encoding="utf8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json(data: Any, path: Path) -> None:
    # Write next to the target, then rename: an interrupted save never leaves half a JSON file behind.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def modules_config(existing: Any = None) -> list[dict[str, Any]]:
    """modules.json: Transformer in the root (with the ``task`` kwarg) then Normalize.

    An existing modules.json whose first module is a Transformer in the root is kept (a sentence-transformers user may
    have appended modules); only the ``task`` kwarg of that first module is ensured.
    """
    first = existing[0] if isinstance(existing, list) and existing and isinstance(existing[0], dict) else {}
    if str(first.get("type", "")).endswith("Transformer") and first.get("path") == "":
        modules = [dict(module) for module in existing]
        kwargs = list(modules[0].get("kwargs") or [])
        modules[0]["kwargs"] = kwargs + [k for k in TRANSFORMER_KWARGS if k not in kwargs]
        return modules
    return [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE, "kwargs": list(TRANSFORMER_KWARGS)},
        {"idx": 1, "name": "1", "path": NORMALIZE_DIR, "type": NORMALIZE_TYPE},
    ]


def sentence_bert_config(existing: Any = None, max_seq_length: int | None = None) -> dict[str, Any]:
    """sentence_bert_config.json: the Transformer module's settings.

    Keys SLQ depends on (modality_config, output name, padding) are always enforced; other settings already in the
    file (e.g. ``processing_kwargs``) are kept. ``max_seq_length`` (``SLQModel.max_prompt_length()``, given by every
    ``save_pretrained``) is written as is: sentence-transformers then truncates over-long texts and restores the
    chat-template tail, giving the same prompt as ``SLQModel.encode``. It is the model's limit, not a merge with the
    file's: a re-save writes what a fresh save of the same model writes, even when an earlier save (e.g. of a model
    with more queries) wrote a smaller one. A smaller limit a user chose by editing the file therefore lasts until
    the next ``save_pretrained`` (this code cannot tell a hand edit from an earlier save's value); to keep one, set
    ``SentenceTransformer.max_seq_length`` and save with ``SentenceTransformer.save``, which writes this file after
    the model. ``max_seq_length=None`` (a caller that does not know the limit) keeps the file's value.
    """
    config = dict(existing) if isinstance(existing, dict) else {}
    config.setdefault("processing_kwargs", DEFAULT_PROCESSING_KWARGS)
    if max_seq_length is not None:
        config["max_seq_length"] = max_seq_length
    config.update(json.loads(json.dumps(REQUIRED_SENTENCE_BERT_CONFIG)))  # deep copy of the constants
    return config


def st_model_config(existing: Any = None, prompts: dict[str, str] | None = None) -> dict[str, Any]:
    """config_sentence_transformers.json: model type, prompts, similarity, version requirement.

    Values already in the file win over the defaults (sentence-transformers writes this file, with the user's prompts,
    just before it asks SLQModel to save itself); ``prompts`` given explicitly win over both.
    """
    config: dict[str, Any] = {
        "model_type": "SentenceTransformer",
        "prompts": dict(DEFAULT_PROMPTS),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        **(existing if isinstance(existing, dict) else {}),
    }
    if prompts is not None:
        config["prompts"] = dict(prompts)
    config["requirements"] = {**ST_REQUIREMENTS, **(config.get("requirements") or {})}  # the file's own win
    return config


def write_sentence_transformers_files(save_directory: str | os.PathLike, prompts: dict[str, str] | None = None,
                                      max_seq_length: int | None = None) -> None:
    """Write (or update) modules.json, sentence_bert_config.json, 1_Normalize/config.json and
    config_sentence_transformers.json in an SLQ folder.

    Args:
        save_directory: the SLQ folder (config.json, model.safetensors and the processor files live there too).
        prompts: sentence-transformers prompts by name (``{"query": ..., "document": ...}``); ``None`` keeps the
            prompts already in the folder, or the empty defaults.
        max_seq_length: the model's prompt limit (``SLQModel.max_prompt_length()``); see :func:`sentence_bert_config`.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    write_json(modules_config(read_json(out / MODULES_NAME)), out / MODULES_NAME)
    write_json(sentence_bert_config(read_json(out / SENTENCE_BERT_CONFIG_NAME), max_seq_length),
               out / SENTENCE_BERT_CONFIG_NAME)
    normalize_dir = out / NORMALIZE_DIR
    normalize_dir.mkdir(exist_ok=True)
    write_json({"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
               normalize_dir / "config.json")
    write_json(st_model_config(read_json(out / ST_CONFIG_NAME), prompts), out / ST_CONFIG_NAME)
