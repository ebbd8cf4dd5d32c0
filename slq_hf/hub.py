"""Publishing SLQ models: export a hub-ready folder with a model card, push it, import reference checkpoints.

- :func:`export`: SLQ folder -> hub-ready folder: config.json (pinned backbone id + revision, version stamps), the
  queries-only model.safetensors (checked), the ``slq_hf/modeling`` code, processor files, sentence-transformers
  files and README.md rendered from the repository's ``MODEL_CARD.md`` with the real evaluation numbers.
- :func:`push`: upload a hub-ready folder with huggingface_hub; nothing that looks like backbone weights goes up.
- :func:`convert_reference`: queries trained by the paper's research code (``torch.save`` of a tensor) -> SLQ folder.

Evaluation results (``--eval-results``) are the JSON that ``slq-hf eval`` writes, see :func:`load_eval_results`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .modeling.configuration_slq import SLQConfig
from .modeling.upload import SLQ_TENSOR_NAMES, WEIGHTS_NAME, collect_upload_files, upload_slq_folder

README_NAME = "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
TRAINER_STATE_NAME = "trainer_state.json"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
CARD_TAGS = ("slq", "sentence-transformers", "multimodal-embedding")
PAPER_URL = "https://arxiv.org/abs/2604.13710"
# Usage snippets name this org until the export is told its repo id (`--repo-id`); push warns about it.
PLACEHOLDER_ORG = "your-org"

# Result block key (as ``slq-hf eval`` writes them) -> (row label, model-index task type, task name). The task types
# differ per direction because the Hub's model-index groups results by (task type, dataset, split).
DIRECTIONS: dict[str, tuple[str, str, str]] = {
    "i2t": ("image → text", "image-to-text-retrieval", "Image-to-text retrieval"),
    "t2i": ("text → image", "text-to-image-retrieval", "Text-to-image retrieval"),
    "i2t_dedup": ("image → text (duplicate captions = hits)", "image-to-text-retrieval-dedup",
                  "Image-to-text retrieval (duplicate captions count as hits)"),
    "t2i_dedup": ("text → image (duplicate captions = hits)", "text-to-image-retrieval-dedup",
                  "Text-to-image retrieval (duplicate captions count as hits)"),
    "composed": ("composed (image + text → image)", "composed-image-retrieval", "Composed image retrieval"),
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; expected a number.")
    if not 0 <= value <= 1:
        raise ValueError(f"{where} is {value!r}; recall values in the results JSON are fractions in [0, 1] (the "
                         "model card shows them as percentages).")
    return float(value)


def parse_eval_results(data: Any, source: str = "evaluation results") -> list[EvalBlock]:
    """Validate parsed results JSON (see :func:`load_eval_results`) and flatten it to blocks, in file order."""
    blocks = []
    for name, result in _result_list(data, source):
        info = result.get("dataset") or {}
        if isinstance(info, str):
            info = {"name": info}
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
                num_queries=block.get("num_queries"),
            ))
    if not blocks:
        raise ValueError(f"{source}: no recall values (keys \"R@k\") found in any result.")
    return blocks


def load_eval_results(path: str | os.PathLike) -> list[EvalBlock]:
    """Read a results JSON written by ``slq-hf eval`` (``slq_hf.evaluation``).

    Format: one result ``{"dataset": {"name": "flickr30k", "split"?: "test", "id"?: "<hub dataset id>"},
    "metrics": {"t2i": {"R@1": 0.764, "R@5": ..., "mean_rank": ..., "num_queries": ...}, "i2t": {...}}}``, or a
    list of such results, or ``{"results": [...]}``, or ``{"<dataset name>": result, ...}``. Recall values are
    fractions in [0, 1]; the card shows percentages. Direction keys: ``i2t``, ``t2i``, ``i2t_dedup``, ``t2i_dedup``,
    ``composed`` (others are shown under their own name).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the evaluation results ({err}).") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err
    return parse_eval_results(data, str(path))


# ------------------------------------------------------------------------------------------------------- model card
def _is_local_path(name: str | None) -> bool:
    return bool(name) and (os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists())


def _eval_table(blocks: list[EvalBlock]) -> str:
    recall_keys = list(dict.fromkeys(k for b in blocks for k in b.recalls))
    header = ["Dataset", "Split", "Direction", *[f"{k} (%)" for k in recall_keys], "Mean rank", "Queries"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for b in blocks:
        label = DIRECTIONS[b.direction][0] if b.direction in DIRECTIONS else b.direction
        recalls = [f"{100 * b.recalls[k]:.1f}" if k in b.recalls else "–" for k in recall_keys]
        mean_rank = f"{b.mean_rank:.1f}" if isinstance(b.mean_rank, (int, float)) else "–"
        lines.append("| " + " | ".join([b.dataset, b.split or "–", label, *recalls, mean_rank,
                                          str(b.num_queries) if b.num_queries is not None else "–"]) + " |")
    return "\n".join(lines)


def _eval_results_for_index(blocks: list[EvalBlock]) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for b in blocks:
        _, task_type, task_name = DIRECTIONS.get(b.direction, ("", f"{b.direction}-retrieval",
                                                                 f"Retrieval ({b.direction})"))
        for key, value in b.recalls.items():
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=b.dataset_id or b.dataset,
                dataset_name=b.dataset, dataset_split=b.split, metric_type=f"recall_at_{key[2:]}",
                metric_name=key, metric_value=round(100 * value, 2),
            ))
    return results


def _training_rows(training_info: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not training_info:
        return []
    return [(str(k).replace("_", " "), str(v)) for k, v in training_info.items() if v not in (None, "", [], {})]


def _trainer_state_info(path: Path) -> dict[str, Any]:
    """Steps/epochs/batch size from a Trainer's trainer_state.json, when the folder has one."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    info = {"steps": state.get("global_step"), "epochs": state.get("epoch"),
            "batch size per device": state.get("train_batch_size")}
    return {k: v for k, v in info.items() if v is not None}


def render_model_card(
    config: SLQConfig,
    *,
    model_name: str,
    repo_id: str | None = None,
    eval_results: list[EvalBlock] | None = None,
    training_info: Mapping[str, Any] | None = None,
    learned_temperature: float | None = None,
    license: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """README.md text of an SLQ model, rendered from the ``MODEL_CARD.md`` Jinja template.

    Every number comes from the arguments: with no ``eval_results`` the card says that no evaluation results were
    provided, with no ``training_info`` that the training data and schedule were not recorded. ``repo_id`` is the
    id the usage snippets load (default: ``your-org/<model_name>``, a placeholder).
    """
    import jinja2
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from .modeling.version import SLQ_HF_VERSION

    template_path = Path(template) if template is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template {template_path} not found. It ships at the root of the slq_hf "
                                "repository; pass template=PATH (`--template PATH`) to use another copy.")
    backbone = config.backbone_name_or_path
    hub_backbone = backbone if backbone and not _is_local_path(backbone) else None
    blocks = eval_results or []
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_backbone,
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=list(CARD_TAGS),
        # A placeholder that points at the backbone's terms: queries trained on a model are bound by its licence.
        license=license or "other",
        license_name=None if license else "same-as-base-model",
        license_link=None if license or not hub_backbone else f"https://huggingface.co/{hub_backbone}",
        eval_results=_eval_results_for_index(blocks) or None,
    )
    hidden = config.hidden_size
    num_params = config.num_queries * hidden + 1 if hidden else None
    if hidden and config.projection_dim:
        num_params += hidden * config.projection_dim + config.projection_dim
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(template_path.read_text(encoding="utf-8")).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id or f"{PLACEHOLDER_ORG}/{model_name}",
        versions={"slq_hf": SLQ_HF_VERSION, "transformers": transformers.__version__, "torch": torch.__version__},
        base_model=backbone,
        base_model_is_hub=hub_backbone is not None,
        base_model_revision=config.backbone_revision,
        config=config,
        num_trainable_params=f"{num_params:,}" if num_params else "unknown",
        learned_temperature=f"{learned_temperature:.4f}" if learned_temperature is not None else None,
        has_eval_results=bool(blocks),
        eval_table=_eval_table(blocks) if blocks else "",
        eval_datasets=sorted({b.dataset for b in blocks}),
        training_rows=_training_rows(training_info),
        license=license,
        paper_url=PAPER_URL,
    )
    return str(ModelCard(text))  # parses the YAML header: a broken template fails here, not on the Hub


# ------------------------------------------------------------------------------------------------------------ export
def _read_trainable_state(path: Path, config: SLQConfig) -> dict[str, torch.Tensor]:
    """The tensors of an SLQ model.safetensors, checked against config.json (names, shapes, finite values)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err}).") from err
    foreign = sorted(set(state) - SLQ_TENSOR_NAMES)
    if foreign or "queries" not in state or "logit_scale" not in state:
        raise ValueError(f"{path}: expected the SLQ tensors {sorted(SLQ_TENSOR_NAMES)} (queries and logit_scale "
                         f"required), found {sorted(state)[:8]}. Is this an SLQ checkpoint?")
    expected = (config.num_queries, config.hidden_size) if config.hidden_size else None
    queries = state["queries"]
    if queries.ndim != 2 or (expected and tuple(queries.shape) != expected):
        raise ValueError(f"{path}: queries have shape {tuple(queries.shape)}, but config.json says "
                         f"(num_queries, hidden_size) = {expected}.")
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name!r} is not a finite float tensor; the checkpoint is corrupt.")
    return {k: v.float().contiguous() for k, v in state.items()}


def _model_type(config_path: Path) -> str | None:
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _prepare_out_dir(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the model folder itself; export writes a new folder.")
    if out.exists() and any(out.iterdir()):
        is_export = _model_type(out / "config.json") == "slq"
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace a "
                                  "previous export.")
        if not is_export:
            raise FileExistsError(f"{out} is not empty and is not an SLQ folder; refusing to delete it. Choose an "
                                  "empty or new folder.")
        shutil.rmtree(out)  # a previous export: start clean so no stale file survives
    out.mkdir(parents=True, exist_ok=True)


def _save_processor(src: Path, out: Path, config: SLQConfig) -> bool:
    """Re-save the processor (tokenizer, image processor, chat template); False when none could be loaded."""
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # The tokenizer loader peeks at our config.json and warns that "slq" is not its model type: noise here.
    hf_logging.set_verbosity_error()
    try:
        for source, revision in ((str(src), None), (config.backbone_name_or_path, config.backbone_revision)):
            if not source:
                continue
            try:
                processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
            except (OSError, ValueError, KeyError):
                continue
            processor.save_pretrained(out)
            return True
        return False
    finally:
        hf_logging.set_verbosity(verbosity)


def export(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    eval_results: str | os.PathLike | list[EvalBlock] | None = None,
    training_info: str | os.PathLike | Mapping[str, Any] | None = None,
    backbone: str | None = None,
    backbone_revision: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    template: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write a hub-ready copy of the SLQ folder ``model_dir`` to ``out_dir``; returns the files, as push would send.

    The backbone is never loaded: the export works on the files. Written: config.json (backbone id and revision
    pinned, versions stamped), model.safetensors (only SLQ tensors, checked against config.json), the modeling code
    of this slq_hf, the processor files, the sentence-transformers files and README.md (from ``MODEL_CARD.md``).
    Anything else in ``model_dir`` (optimizer state, training arguments, checkpoints) is left behind.

    Args:
        eval_results: path of a results JSON from ``slq-hf eval`` (or parsed blocks); without it the card says that
            no evaluation results were provided.
        training_info: a JSON file or mapping of training facts (dataset, steps, learning rate...) for the card;
            by default the steps and epochs of a ``trainer_state.json`` in ``model_dir``, if there is one.
        backbone / backbone_revision: re-pin the backbone (e.g. replace a local path with its Hub id, pin a commit).
        model_name: title of the card (default: the name of ``out_dir``).
        repo_id: the Hub id the card's usage snippets load (default: a ``your-org/<model_name>`` placeholder).
        license: licence id for the card header (default: a placeholder pointing at the backbone's licence).
        overwrite: replace ``out_dir`` if it holds a previous export.
    """
    src, out = Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected an SLQ folder written by save_pretrained.")
    if not (src / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in src.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" It holds {pickles}: convert research-code queries with `slq-hf convert-reference`."
                if pickles else "")
        raise FileNotFoundError(f"{src}: no {WEIGHTS_NAME}.{hint}")
    model_type = _model_type(src / "config.json")
    if model_type != "slq":
        raise ValueError(f"{src}/config.json has model_type {model_type!r}, not 'slq'; export takes an SLQ folder "
                         "(SLQModel.save_pretrained), not a backbone.")
    config = SLQConfig.from_pretrained(src)
    if backbone:
        config.backbone_name_or_path = backbone
    if backbone_revision:
        config.backbone_revision = backbone_revision
    if not config.backbone_name_or_path:
        raise ValueError(f"{src}: config.json pins no backbone; pass backbone=HUB_ID (--backbone).")
    if _is_local_path(config.backbone_name_or_path):
        warnings.warn(f"The backbone is pinned as the local path {config.backbone_name_or_path!r}: the export will "
                      "only load where that path exists. Pass backbone=HUB_ID (--backbone) to pin its Hub id.",
                      UserWarning, stacklevel=2)
    elif not config.backbone_revision:
        warnings.warn(f"The backbone {config.backbone_name_or_path!r} is not pinned to a revision, so the export "
                      "loads whatever that repository holds later. Pass backbone_revision=COMMIT "
                      "(--backbone-revision) for a reproducible model.", UserWarning, stacklevel=2)
    state = _read_trainable_state(src / WEIGHTS_NAME, config)
    blocks = load_eval_results(eval_results) if isinstance(eval_results, (str, os.PathLike)) else eval_results
    if isinstance(training_info, (str, os.PathLike)):
        training_info = json.loads(Path(training_info).read_text(encoding="utf-8"))
        if not isinstance(training_info, Mapping):
            raise ValueError(f"{training_info}: training info must be a JSON object of name -> value.")
    elif training_info is None and (src / TRAINER_STATE_NAME).is_file():
        training_info = _trainer_state_info(src / TRAINER_STATE_NAME)

    _prepare_out_dir(out, src, overwrite)
    from .modeling import modeling_slq
    from .modeling.safetensors_io import atomic_save_file
    from .modeling.sentence_transformers_files import write_sentence_transformers_files

    config.auto_map = {"AutoConfig": "configuration_slq.SLQConfig", "AutoModel": "modeling_slq.SLQModel"}
    config.architectures = ["SLQModel"]
    config.save_pretrained(out)
    atomic_save_file(state, out / WEIGHTS_NAME, metadata=modeling_slq.WEIGHTS_METADATA)
    # Same rule as SLQModel.save_pretrained: every modeling file, so trust_remote_code resolves sibling imports.
    for source in Path(modeling_slq.__file__).parent.glob("*.py"):
        if source.name != "__init__.py":
            shutil.copyfile(source, out / source.name)
    if not _save_processor(src, out, config):
        warnings.warn(f"No processor could be loaded from {src} or the backbone; the export has no processor files "
                      "and SLQModel.from_pretrained will fetch the backbone's.", UserWarning, stacklevel=2)
    # Keep the user's sentence-transformers settings (prompts, max length) and fill in whatever is missing.
    for name in ST_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    write_sentence_transformers_files(out)
    card = render_model_card(
        config, model_name=model_name or out.resolve().name, repo_id=repo_id, eval_results=blocks,
        training_info=training_info, learned_temperature=math.exp(-state["logit_scale"].item()), license=license,
        template=template,
    )
    (out / README_NAME).write_text(card, encoding="utf-8")
    return collect_upload_files(out)  # the export must be pushable: this is the check push makes


# -------------------------------------------------------------------------------------------------------------- push
def push(
    hub_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Upload a folder made by :func:`export` to ``repo_id``; returns huggingface_hub's ``CommitInfo``.

    Only the files :func:`slq_hf.modeling.upload.collect_upload_files` allows go up; a folder holding anything that
    looks like backbone weights is refused before any network call.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    root = Path(hub_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is invalid; expected 'org/name' ({err}).") from err
    files = collect_upload_files(root)
    if README_NAME not in files:
        warnings.warn(f"{root} has no {README_NAME}: the repository will have no model card. Make the folder with "
                      "`slq-hf export` to get one.", UserWarning, stacklevel=2)
    elif f'"{repo_id}"' not in (root / README_NAME).read_text(encoding="utf-8", errors="replace"):
        warnings.warn(f"The model card's usage snippets do not load {repo_id!r}; re-export with --repo-id "
                      f"{repo_id} so they do.", UserWarning, stacklevel=2)
    return upload_slq_folder(root, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                             commit_message=commit_message)


# ------------------------------------------------------------------------------------------------ convert-reference
def _reference_tensor(path: Path) -> torch.Tensor:
    import pickle

    try:
        # weights_only: a pickle can run any code on load; only tensors and plain containers are accepted.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors (pickled code or "
                         f"classes), which torch.load(weights_only=True) does not execute. Re-save the queries as a "
                         f"plain tensor: torch.save(queries.detach().cpu(), path). Details: {err}") from err
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch.save file ({err}).") from err
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        named = [k for k in ("meta_queries", "queries", "latent_queries") if k in tensors]
        if named:
            obj = tensors[named[0]]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: a dict with keys {sorted(map(str, obj))[:10]}; expected a tensor, or a dict "
                             "with one tensor or a 'meta_queries'/'queries' entry.")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a tensor [N_q, hidden] or [hidden].")
    return obj


def _backbone_hidden_size(backbone: str, revision: str | None) -> int | None:
    """The backbone's text hidden size from its config alone (no weights), for an early, clear width check."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(backbone, revision=revision)
    return getattr(config.get_text_config(), "hidden_size", None)


def convert_reference(
    queries_path: str | os.PathLike,
    backbone: str,
    out_dir: str | os.PathLike,
    *,
    num_queries: int | None = None,
    revision: str | None = None,
    temperature: float = 0.07,
    **backbone_kwargs,
) -> Path:
    """Turn queries trained with the paper's research code into an SLQ folder.

    Args:
        queries_path: ``torch.save`` file holding a tensor ``[N_q, hidden]`` (or ``[hidden]``: one query vector,
            repeated ``num_queries`` times, as research code that broadcasts a single query does). A dict with a
            ``meta_queries``/``queries`` entry is accepted too. Read with ``torch.load(weights_only=True)``: files
            holding pickled code are refused.
        backbone: Hub id or local path of the backbone the queries were trained on (its hidden size must match).
        out_dir: the SLQ folder to write (save_pretrained layout).
        num_queries: for a ``[N_q, hidden]`` tensor, must equal N_q if given; for ``[hidden]``, how many query slots
            the vector fills (default 1).
        revision: backbone revision to load and pin.
        temperature: contrastive temperature stored with the queries (research files hold only the queries).
        **backbone_kwargs: go to the backbone's ``from_pretrained`` (``dtype``, ``device_map``...).
    """
    from .modeling import SLQModel

    path = Path(queries_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(num_queries, int)
                                    or num_queries < 1):
        raise ValueError(f"num_queries={num_queries!r} is invalid; expected a positive integer.")
    tensor = _reference_tensor(path)
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: the queries have dtype {tensor.dtype}; expected a float tensor.")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0).expand(num_queries or 1, -1)  # (N_q, H): one vector in every slot
    elif tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]  # (1, N_q, H) as saved from a batched parameter
    if tensor.ndim != 2:
        raise ValueError(f"{path}: queries have shape {tuple(tensor.shape)}; expected [N_q, hidden] or [hidden].")
    if num_queries is not None and tensor.shape[0] != num_queries:
        raise ValueError(f"{path}: holds {tensor.shape[0]} queries but num_queries={num_queries} was given.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: the queries contain NaN or Inf values.")
    hidden_size = _backbone_hidden_size(backbone, revision)
    width = tensor.shape[1]
    if hidden_size is not None and hidden_size != width:
        raise ValueError(f"{path}: the queries are {width} wide, but the backbone {backbone!r} has hidden size "
                         f"{hidden_size}. They were trained for a different backbone; pass the one they were "
                         "trained on (--backbone).")
    model = SLQModel.from_backbone(backbone, num_queries=tensor.shape[0], revision=revision, temperature=temperature,
                                   **backbone_kwargs)
    state = model.trainable_state_dict()
    state["queries"] = tensor.float().contiguous()
    model.load_trainable_state(state)  # checks the shape against the loaded embedding width once more
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
