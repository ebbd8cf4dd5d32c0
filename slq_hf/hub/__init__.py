"""Publishing SLQ models: export a hub-ready folder with a model card, push it, import reference checkpoints.

- :func:`export` (``slq-hf export``): SLQ folder -> hub-ready folder: config.json (pinned backbone id + revision,
  version stamps), the queries-only model.safetensors (checked), the modeling code, processor and
  sentence-transformers files, and README.md rendered from the ``MODEL_CARD.md`` template shipped in this package,
  with the real evaluation numbers and what the training run recorded.
- :func:`push` (``slq-hf push``): upload a hub-ready folder with huggingface_hub; nothing that looks like backbone
  weights goes up (:func:`collect_upload_files`).
- :func:`convert_reference` (``slq-hf convert-reference``): queries trained by the paper's research code -> SLQ
  folder.
"""

from .card import (
    MODEL_CARD_TEMPLATE,
    TRAINING_SUMMARY_NAME,
    EvalBlock,
    load_eval_results,
    parse_eval_results,
    read_training_info,
    render_model_card,
)
from .convert_reference import convert_reference
from .export import export
from .publish import collect_upload_files, default_model_card, push, upload_folder

__all__ = [
    "MODEL_CARD_TEMPLATE",
    "TRAINING_SUMMARY_NAME",
    "EvalBlock",
    "collect_upload_files",
    "convert_reference",
    "default_model_card",
    "export",
    "load_eval_results",
    "parse_eval_results",
    "push",
    "read_training_info",
    "render_model_card",
    "upload_folder",
]
