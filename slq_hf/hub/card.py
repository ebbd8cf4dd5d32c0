"""The model card: evaluation results (:func:`load_eval_results`), training facts (:func:`read_training_info`) and
the ``MODEL_CARD.md`` template shipped in this package, rendered (:func:`render_model_card`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluation.report import DIRECTIONS as ROW_LABELS
from ..modeling.checkpoint import expected_tensors
from ..modeling.configuration_slq import SLQConfig

# Inside the package, so `slq-hf export` finds it after a regular (non-editable) install.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "MODEL_CARD.md"
TRAINING_SUMMARY_NAME = "training_summary.json"
TRAINER_STATE_NAME = "trainer_state.json"
# Training-summary keys that only mean something on the machine that trained (not shown on the card).
LOCAL_ONLY = frozenset({"output_dir", "resumed_from"})
CARD_TAGS = ("slq", "sentence-transformers", "multimodal-embedding")
PAPER_URL = "https://arxiv.org/abs/2604.13710"
# Usage snippets name this org until the export is told its repo id (`--repo-id`); push warns about it.
PLACEHOLDER_ORG = "your-org"

# Result block key (as ``slq-hf eval`` writes them) -> (model-index task type, task name); row labels: ROW_LABELS.
# The task types differ per direction because the Hub's model-index groups results by (task type, dataset, split).
DIRECTIONS: dict[str, tuple[str, str]] = {
    "i2t": ("image-to-text-retrieval", "Image-to-text retrieval"),
    "t2i": ("text-to-image-retrieval", "Text-to-image retrieval"),
    "i2t_dedup": ("image-to-text-retrieval-dedup", "Image-to-text retrieval (duplicate captions count as hits)"),
    "t2i_dedup": ("text-to-image-retrieval-dedup", "Text-to-image retrieval (duplicate captions count as hits)"),
    "composed": ("composed-image-retrieval", "Composed image retrieval"),
}


# ----------------------------------------------------------------------------------------------- evaluation results
@dataclass(frozen=True)
class EvalBlock:
    """One dataset x direction of an evaluation: recall fractions in [0, 1] keyed ``R@k``, plus ranks."""

    dataset: str
    direction: str
    recalls: dict[str, float]
    split: str | None = None
    dataset_id: str | None = None
    mean_rank: float | None = None
    median_rank: float | None = None
    num_queries: int | None = None
    source: str | None = None  # the results file, for messages
    queries_sha256: str | None = None  # :func:`queries_digest` of the model `slq-hf eval` ran (None: not recorded)


def queries_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the SLQ tensors that shape the embeddings (``queries``, the optional head), as float32.

    ``slq-hf eval`` records it with its results and ``export`` compares it with the folder's ``model.safetensors``,
    so a card never shows another model's numbers. ``logit_scale`` (the training temperature) is left out: it changes
    no embedding, and a re-save with another temperature keeps its results.
    """
    hasher = hashlib.sha256()
    for name in sorted(state):
        if name == "logit_scale":
            continue
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        hasher.update(f"{name}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.numpy().tobytes())
    return hasher.hexdigest()


def _result_list(data: Any, source: str) -> list[tuple[str | None, Mapping[str, Any]]]:
    """Accept one result, a list of results, ``{"results": [...]}`` or ``{name: result}``; return (name, result)."""
    if isinstance(data, Mapping) and "metrics" in data:
        return [(None, data)]
    if isinstance(data, Mapping) and isinstance(data.get("results"), (list, Mapping)):
        return _result_list(data["results"], source)
    if isinstance(data, list) and all(isinstance(r, Mapping) and "metrics" in r for r in data):
        return [(None, r) for r in data]
    if isinstance(data, Mapping) and data and all(isinstance(r, Mapping) and "metrics" in r for r in data.values()):
        return [(str(name), r) for name, r in data.items()]
    raise ValueError(
        f"{source}: not an evaluation results file. Expected the JSON `slq-hf eval` writes: a result "
        '{"dataset": {"name": ...}, "metrics": {"t2i": {"R@1": 0.5, ...}, "i2t": {...}}}, a list of such results, '
        '{"results": [...]} or {"<dataset name>": result}; recall values are fractions in [0, 1].'
    )


def _fraction(value: Any, where: str) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{where} is {value!r}; recall values in the results JSON are fractions in [0, 1] (the "
                         "model card shows them as percentages).")
    return float(value)


def parse_eval_results(data: Any, source: str = "evaluation results") -> list[EvalBlock]:
    """Validate parsed results JSON (see :func:`load_eval_results`) and flatten it to blocks, in file order."""
    blocks = []
    for name, result in _result_list(data, source):
        model = result.get("model")
        digest = model.get("queries_sha256") if isinstance(model, Mapping) else None
        info = result.get("dataset") or {}
        info = {"name": info} if isinstance(info, str) else info
        dataset = str(info.get("name") or name or "")
        if not dataset:
            raise ValueError(f"{source}: a result has no dataset name (\"dataset\": {{\"name\": ...}}).")
        metrics = result["metrics"]
        if not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"{source}: \"metrics\" of {dataset!r} must be a non-empty object.")
        for direction, block in metrics.items():
            if not isinstance(block, Mapping):
                continue  # scalar extras (e.g. a modality gap) are not retrieval blocks
            where = f"{source}: {dataset}/{direction}"
            recalls = {k: _fraction(v, f"{where}/{k}") for k, v in block.items() if str(k).startswith("R@")}
            if not recalls:
                continue
            recalls = dict(sorted(recalls.items(), key=lambda kv: int(kv[0][2:]) if kv[0][2:].isdigit() else 10**9))
            blocks.append(EvalBlock(
                dataset=dataset, direction=str(direction), recalls=recalls,
                # `slq-hf eval` records the split it ran on under "data"; hand-written files may put it elsewhere.
                split=info.get("split") or (result.get("data") or {}).get("split") or result.get("split"),
                dataset_id=info.get("id") or info.get("hub_id") or info.get("path_or_id"),
                mean_rank=block.get("mean_rank"), median_rank=block.get("median_rank"),
                num_queries=block.get("num_queries"), source=source,
                queries_sha256=digest if isinstance(digest, str) else None,
            ))
    if not blocks:
        raise ValueError(f"{source}: no recall values (keys \"R@k\") found in any result.")
    return blocks


def load_eval_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[EvalBlock]:
    """Read one or several results JSON files written by ``slq-hf eval`` (``slq_hf.evaluation``), in order.

    Format: one result ``{"dataset": {"name": "flickr30k", "split"?: "test", "id"?: "<hub dataset id>"},
    "metrics": {"t2i": {"R@1": 0.764, "R@5": ..., "mean_rank": ..., "num_queries": ...}, "i2t": {...}}}``, or a
    list of such results, or ``{"results": [...]}``, or ``{"<dataset name>": result, ...}``. Recall values are
    fractions in [0, 1]; the card shows percentages. Direction keys: ``i2t``, ``t2i``, ``i2t_dedup``, ``t2i_dedup``,
    ``composed`` (others are shown under their own name). The same dataset, split and direction twice (in two files,
    in one file, or one file given twice) is an error: the card would show two different numbers for one thing.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    blocks, seen = [], {}
    for path in map(Path, paths):
        for block in parse_eval_results(read_json(path, "evaluation results", object_only=False), str(path)):
            key = (block.dataset, block.split, block.direction)
            if key in seen:
                where = "earlier in the same file" if seen[key] == path else f"in {seen[key]}"
                raise ValueError(f"{path}: {block.dataset}/{block.direction} (split {block.split}) is also {where}; "
                                 "give each evaluation once (a file comparing several models is not one model's "
                                 "results). Two data files of one name (coco/test.jsonl, flickr/test.jsonl) give "
                                 "one dataset name: set \"dataset\": {\"name\"} in one of the results files.")
            seen[key] = path
            blocks.append(block)
    return blocks


# --------------------------------------------------------------------------------------------------- training facts
def _trainer_state_info(path: Path) -> dict[str, Any]:
    """Steps/epochs/batch size and the highest logged learning rate from a Trainer's trainer_state.json."""
    if not path.is_file():
        return {}
    state = read_json(path, "trainer state")
    logged = [entry.get("learning_rate") for entry in state.get("log_history") or [] if "learning_rate" in entry]
    info = {"steps": state.get("global_step"), "epochs": state.get("epoch"),
            "batch size per device": state.get("train_batch_size"),
            "learning rate (peak logged)": max(logged) if logged else None}
    return {k: v for k, v in info.items() if v is not None}


def read_training_info(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the run that wrote ``model_dir`` recorded: its ``training_summary.json``, else the newest
    ``checkpoint-*/trainer_state.json``, else a ``trainer_state.json`` in the folder; None when there is none."""
    folder = Path(model_dir)
    summary = folder / TRAINING_SUMMARY_NAME
    if summary.is_file():
        return read_json(summary, "training summary")
    checkpoints = sorted(folder.glob(f"checkpoint-*/{TRAINER_STATE_NAME}"),  # checkpoint-<step>: newest = most steps
                         key=lambda p: int(p.parent.name[11:]) if p.parent.name[11:].isdigit() else -1)
    states = [*checkpoints[-1:], folder / TRAINER_STATE_NAME]
    return next((info for info in map(_trainer_state_info, states) if info), None)


def read_json(path: str | os.PathLike, what: str, object_only: bool = True) -> Any:
    """The JSON in ``path`` (a JSON object of name -> value unless ``object_only`` is False); ValueError naming the
    file and ``what`` it should hold otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the {what} ({err}).") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} is not valid JSON ({err}).") from err
    if object_only and not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object of name -> value, got {type(data).__name__}.")
    return data


# ------------------------------------------------------------------------------------------------------- rendering
def _is_local_path(name: str | None) -> bool:
    return bool(name) and (os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists())


def _eval_table(blocks: list[EvalBlock]) -> str:
    recall_keys = list(dict.fromkeys(k for b in blocks for k in b.recalls))
    header = ["Dataset", "Split", "Direction", *[f"{k} (%)" for k in recall_keys], "Mean rank", "Queries"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for b in blocks:
        label = ROW_LABELS.get(b.direction, b.direction)
        recalls = [f"{100 * b.recalls[k]:.1f}" if k in b.recalls else "–" for k in recall_keys]
        mean_rank = f"{b.mean_rank:.1f}" if isinstance(b.mean_rank, (int, float)) else "–"
        lines.append("| " + " | ".join([b.dataset, b.split or "–", label, *recalls, mean_rank,
                                          str(b.num_queries) if b.num_queries is not None else "–"]) + " |")
    return "\n".join(lines)


def _shown_float(value: float) -> float:
    """6 decimals, or 6 significant digits below 1: a learning rate of 5e-7 rounded to 6 decimals would show 0.0."""
    return float(f"{value:.6g}") if abs(value) < 1 else round(value, 6)


def _rows(info: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Card rows of a training summary: nested objects flattened ("train_data": {"path"} -> "train data path"),
    empty values and this machine's paths (``LOCAL_ONLY``) left out, floats shown as :func:`_shown_float`."""
    rows = []
    for key, value in info.items():
        name = f"{prefix}{key}".replace("_", " ")
        if isinstance(value, Mapping):
            rows += _rows(value, f"{name} ")
        elif key not in LOCAL_ONLY and value not in (None, "", [], {}):
            rows.append((name, str(_shown_float(value) if isinstance(value, float) else value)))
    return rows


def render_model_card(config: SLQConfig, *, model_name: str, repo_id: str | None = None,
                      eval_results: list[EvalBlock] | None = None, training_info: Mapping[str, Any] | None = None,
                      learned_temperature: float | None = None, license: str | None = None,
                      template: str | os.PathLike | None = None) -> str:
    """README.md text of an SLQ model, rendered from the ``MODEL_CARD.md`` Jinja template (or ``template``).

    Every number comes from the arguments: without ``eval_results``/``training_info`` the card says they were not
    provided/recorded. ``repo_id`` is the id the usage snippets load (default: a ``your-org/<name>`` placeholder).
    """
    import jinja2
    import transformers
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..modeling.version import SLQ_HF_VERSION

    template_path = Path(template) if template is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template {template_path} not found; pass --template PATH (template=) "
                                "pointing at a Jinja card template such as slq_hf's MODEL_CARD.md.")
    backbone = config.backbone_name_or_path
    hub_backbone = backbone if backbone and not _is_local_path(backbone) else None
    blocks = eval_results or []
    model_index = []  # the card header's model-index: one entry per recall value of each block
    for b in blocks:
        task_type, task_name = DIRECTIONS.get(b.direction, (f"{b.direction}-retrieval", f"Retrieval ({b.direction})"))
        model_index += [EvalResult(task_type=task_type, task_name=task_name, dataset_type=b.dataset_id or b.dataset,
                                   dataset_name=b.dataset, dataset_split=b.split, metric_type=f"recall_at_{key[2:]}",
                                   metric_name=key, metric_value=round(100 * v, 2)) for key, v in b.recalls.items()]
    card_data = ModelCardData(
        model_name=model_name, base_model=hub_backbone, library_name="transformers",
        pipeline_tag="feature-extraction", tags=list(CARD_TAGS),
        # A placeholder that points at the backbone's terms: queries trained on a model are bound by its licence.
        license=license or "other",
        license_name=None if license else "same-as-base-model",
        license_link=None if license or not hub_backbone else f"https://huggingface.co/{hub_backbone}",
        eval_results=model_index or None,
    )
    shapes = expected_tensors(config.num_queries, config.hidden_size, config.projection_size).values()
    num_params = sum(map(math.prod, shapes)) if config.hidden_size else None
    training_rows = _rows(training_info or {})
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(template_path.read_text(encoding="utf-8")).render(
        card_data=card_data.to_yaml(), model_name=model_name, repo_id=repo_id or f"{PLACEHOLDER_ORG}/{model_name}",
        versions={"slq_hf": SLQ_HF_VERSION, "transformers": transformers.__version__, "torch": torch.__version__},
        base_model=backbone, base_model_is_hub=hub_backbone is not None, base_model_revision=config.backbone_revision,
        config=config, num_trainable_params=f"{num_params:,}" if num_params else "unknown",
        learned_temperature=f"{learned_temperature:.4f}" if learned_temperature is not None else None,
        has_eval_results=bool(blocks), eval_table=_eval_table(blocks) if blocks else "",
        eval_datasets=list(dict.fromkeys(b.dataset for b in blocks)), training_rows=training_rows, license=license,
        paper_url=PAPER_URL,
    )
    return str(ModelCard(text))  # parses the YAML header: a broken template fails here, not on the Hub
