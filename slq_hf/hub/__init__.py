"""Publishing SLQ models: :func:`export` a hub-ready folder with a model card (``slq-hf export``), :func:`push` it
(``slq-hf push``; nothing that looks like backbone weights goes up) and :func:`convert_reference` queries trained by
the paper's research code (``slq-hf convert-reference``)."""

from .card import EvalBlock, load_eval_results, read_training_info, render_model_card
from .convert_reference import convert_reference
from .export import export
from .publish import check_repo_id, collect_upload_files, push

__all__ = ["EvalBlock", "check_repo_id", "collect_upload_files", "convert_reference", "export",
           "load_eval_results", "push", "read_training_info", "render_model_card"]
