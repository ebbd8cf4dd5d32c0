"""``export``: an SLQ folder -> a hub-ready folder with the queries only and a filled-in model card."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..modeling import checkpoint as ckpt
from ..modeling.configuration_slq import SLQConfig
from .card import (
    EvalBlock,
    _is_local_path,
    load_eval_results,
    queries_digest,
    read_json,
    read_training_info,
    render_model_card,
)
from .publish import README_NAME, check_repo_id, collect_upload_files


def _model_type(config_path: Path) -> str | None:
    try:
        return read_json(config_path, "config").get("model_type")
    except ValueError:
        return None


def _pinned_config(src: Path, backbone: str | None, backbone_revision: str | None) -> SLQConfig:
    if not (src / ckpt.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{src}: no {ckpt.CONFIG_NAME}; expected an SLQ folder written by save_pretrained.")
    if not (src / ckpt.WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in src.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" It holds {pickles}: convert research-code queries with `slq-hf convert-reference`."
                if pickles else "")
        raise FileNotFoundError(f"{src}: no {ckpt.WEIGHTS_NAME}.{hint}")
    model_type = _model_type(src / ckpt.CONFIG_NAME)
    if model_type != "slq":
        raise ValueError(f"{src}/{ckpt.CONFIG_NAME} has model_type {model_type!r}, not 'slq'; export takes an SLQ "
                         "folder (SLQModel.save_pretrained), not a backbone.")
    config = SLQConfig.from_pretrained(src)
    config.backbone_name_or_path = backbone or config.backbone_name_or_path
    config.backbone_revision = backbone_revision or config.backbone_revision
    if not config.backbone_name_or_path:
        raise ValueError(f"{src}: {ckpt.CONFIG_NAME} pins no backbone; pass --backbone HUB_ID (backbone=).")
    if _is_local_path(config.backbone_name_or_path):
        warnings.warn(f"The backbone is pinned as the local path {config.backbone_name_or_path!r}: the export will "
                      "only load where that path exists. Pass --backbone HUB_ID (backbone=) to pin its Hub id.",
                      UserWarning, stacklevel=3)
    elif not config.backbone_revision:
        warnings.warn(f"The backbone {config.backbone_name_or_path!r} is not pinned to a revision, so the export "
                      "loads whatever that repository holds later. Pass --backbone-revision COMMIT "
                      "(backbone_revision=) for a reproducible model.", UserWarning, stacklevel=3)
    return config


def _check_results_are_this_models(blocks: list[EvalBlock], state: Mapping[str, Any], src: Path) -> None:
    """Refuse results that `slq-hf eval` recorded for other queries: the card would show another model's numbers.
    Results without a recorded digest (hand-written files, older versions) cannot be checked and are taken as given."""
    own = queries_digest(state)
    foreign = sorted({b.source or b.dataset for b in blocks if b.queries_sha256 and b.queries_sha256 != own})
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: these results were computed with other queries than the ones in "
                         f"{src / ckpt.WEIGHTS_NAME} (another model or checkpoint); the card would show numbers this "
                         f"model did not produce. Evaluate it (slq-hf eval --model {src}) and pass that file.")


def _check_target(src: Path, out: Path, overwrite: bool) -> None:
    """``out`` may be a new or empty folder, or (``overwrite``) an earlier SLQ export that does not hold ``src``."""
    source, target = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if target == source:
        raise ValueError(f"--out {out} is the model folder itself; export writes a new folder.")
    if target in source.parents:
        # Replacing it would delete the folder being exported (and whatever else the run left there).
        raise ValueError(f"--out {out} holds the model folder {src}; replacing it would delete the source. Export "
                         "to a folder outside it.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace a "
                                  "previous export.")
        if _model_type(out / ckpt.CONFIG_NAME) != "slq":
            raise FileExistsError(f"{out} is not empty and is not an SLQ folder; refusing to delete it. Choose an "
                                  "empty or new folder.")


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
           eval_results: str | os.PathLike | list[str | os.PathLike] | list[EvalBlock] | None = None,
           training_info: str | os.PathLike | Mapping[str, Any] | None = None, backbone: str | None = None,
           backbone_revision: str | None = None, model_name: str | None = None, repo_id: str | None = None,
           license: str | None = None, template: str | os.PathLike | None = None, overwrite: bool = False
           ) -> list[str]:
    """Write a hub-ready copy of the SLQ folder ``model_dir`` to ``out_dir`` (atomically); returns the files, as
    push would send them. The backbone is never loaded. Written: config.json (backbone id and revision pinned,
    versions stamped), model.safetensors (only SLQ tensors, checked against config.json), query sets, the modeling
    code, processor and sentence-transformers files, README.md. Optimizer state, training arguments and checkpoints
    are left behind.

    Args:
        eval_results: results JSON file(s) from ``slq-hf eval`` (or parsed blocks); all reach the card.
        training_info: a JSON file or mapping of training facts for the card (default: what the run recorded,
            :func:`~slq_hf.hub.card.read_training_info`).
        backbone / backbone_revision: re-pin the backbone (e.g. replace a local path with its Hub id, pin a commit).
        model_name / repo_id / license: card title (default: ``out_dir``'s name), the id its usage snippets load, the
            licence id (default: a placeholder pointing at the backbone's licence).
        overwrite: replace ``out_dir`` if it holds a previous export.
    """
    from ..modeling import modeling_slq
    from ..modeling.sentence_transformers_files import write_sentence_transformers_files

    src, out = Path(model_dir), Path(out_dir)
    if repo_id is not None:
        check_repo_id(repo_id)  # the card's usage snippets load it
    config = _pinned_config(src, backbone, backbone_revision)
    state = ckpt.read_tensors(src / ckpt.WEIGHTS_NAME, ckpt.expected_tensors(config.num_queries, config.hidden_size,
                                                              config.projection_size))
    query_sets = (src / ckpt.QUERY_SETS_INDEX).is_file() and ckpt.read_query_set_index(src / ckpt.QUERY_SETS_INDEX)
    if eval_results is not None and not (isinstance(eval_results, list) and eval_results
                                         and isinstance(eval_results[0], EvalBlock)):
        eval_results = load_eval_results(eval_results)
    _check_results_are_this_models(eval_results or [], state, src)
    if isinstance(training_info, (str, os.PathLike)):
        training_info = read_json(training_info, "training info")
    elif training_info is None:
        training_info = read_training_info(src)
    card = render_model_card(
        config, model_name=model_name or out.resolve().name, repo_id=repo_id, eval_results=eval_results,
        training_info=training_info, learned_temperature=math.exp(-state["logit_scale"].item()), license=license,
        template=template,
    )
    _check_target(src, out, overwrite)

    def write(staging: Path) -> None:
        config.auto_map = {"AutoConfig": "configuration_slq.SLQConfig", "AutoModel": "modeling_slq.SLQModel"}
        config.architectures = ["SLQModel"]
        config.save_pretrained(staging)
        ckpt.save_tensors(state, staging / ckpt.WEIGHTS_NAME, metadata=ckpt.WEIGHTS_METADATA)
        if query_sets:  # validated above; the set files are checked again by the upload guard
            shutil.copytree(src / ckpt.QUERY_SETS_DIR, staging / ckpt.QUERY_SETS_DIR)
        # Same rule as SLQModel.save_pretrained: every modeling file, so trust_remote_code resolves sibling imports.
        for source in Path(modeling_slq.__file__).parent.glob("*.py"):
            if source.name != "__init__.py":
                shutil.copyfile(source, staging / source.name)
        # The folder's processor (tokenizer, image processor, chat template), else the backbone's.
        sources = ((src, None), (config.backbone_name_or_path, config.backbone_revision))
        loaded = (modeling_slq.try_processor(source, revision, quiet=True) for source, revision in sources)
        processor = next((p for p in loaded if p is not None), None)
        if processor is not None:
            processor.save_pretrained(staging)
        else:
            warnings.warn(f"No processor could be loaded from {src} or the backbone; the export has no processor "
                          "files and SLQModel.from_pretrained will fetch the backbone's.", UserWarning, stacklevel=3)
        # Keep the user's sentence-transformers settings (prompts, max length) and fill in whatever is missing.
        for name in ckpt.SEEDED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        write_sentence_transformers_files(staging)
        (staging / README_NAME).write_text(card, encoding="utf-8")

    # The export must be pushable (the check push makes); replace_all: files of an earlier export's folder that this
    # export does not write (a Trainer's checkpoint-*/ ...) are not carried into it.
    return collect_upload_files(ckpt.write_folder(out, write, replace_all=True))
