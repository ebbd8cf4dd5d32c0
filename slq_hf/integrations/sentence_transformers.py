"""sentence-transformers helpers for SLQ models (optional dependency: ``pip install slq_hf[sentence-transformers]``).

Every folder ``SLQModel.save_pretrained`` writes already loads with plain sentence-transformers::

    SentenceTransformer(folder, trust_remote_code=True)

The helpers here cover what that one line cannot: wrapping an SLQ model that lives only in memory (fresh queries
from ``SLQModel.from_backbone``, ready to train with ``SentenceTransformerTrainer``) without loading the backbone a
second time. Models returned by these helpers (or passed to :func:`use_encode_input_handling`) also take their inputs
the way ``SLQModel.encode`` does (validation, image decoding, path rule; see the README), instead of
sentence-transformers' own input handling. Importing this module without sentence-transformers installed works;
calling a helper then raises an ImportError that says what to install.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import TYPE_CHECKING, Any

from ..modeling.budgets import BUDGET_FIELDS, processor_with_budgets
from ..modeling.modeling_slq import SLQModel
from ..modeling.processing_slq import SLQInputError, image_budget, limit_text, to_item
from ..modeling.sentence_transformers_files import write_sentence_transformers_files
from ..processing import sentence_transformers_input

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_INSTALL_HINT = ("sentence-transformers>=6 is not installed; install it with "
                 "`pip install 'slq_hf[sentence-transformers]'`.")


def is_sentence_transformers_available() -> bool:
    """True when sentence-transformers 6.x (the version with the multimodal Transformer module) is importable."""
    try:
        import sentence_transformers
    except ImportError:
        return False
    major = sentence_transformers.__version__.split(".", 1)[0]
    return major.isdigit() and int(major) >= 6


def _require_sentence_transformers() -> None:
    if not is_sentence_transformers_available():
        raise ImportError(_INSTALL_HINT)


def load_sentence_transformer(
    path: str | os.PathLike,
    *,
    backbone: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs,
) -> SentenceTransformer:
    """Load an SLQ folder (or Hub repo) as a ``SentenceTransformer``.

    Same as ``SentenceTransformer(path, trust_remote_code=True, ...)``, plus ``backbone=`` to reuse a backbone that is
    already in memory instead of loading the one pinned in config.json.

    Args:
        path: SLQ folder or Hub id written by ``SLQModel.save_pretrained``.
        backbone: an already loaded ``*ForConditionalGeneration`` backbone to share (no second copy of its weights).
        model_kwargs: go to ``SLQModel.from_pretrained`` and from there to the backbone's ``from_pretrained``
            (``dtype``, ``quantization_config``, ``attn_implementation``, ``backbone_name_or_path``...).
        **kwargs: other ``SentenceTransformer`` arguments (``device``, ``prompts``, ``truncate_dim``...).
    """
    _require_sentence_transformers()
    from sentence_transformers import SentenceTransformer

    model_kwargs = dict(model_kwargs or {})
    if backbone is not None:
        model_kwargs["backbone"] = backbone
    kwargs.setdefault("trust_remote_code", True)
    return use_encode_input_handling(SentenceTransformer(str(path), model_kwargs=model_kwargs, **kwargs))


def _is_message(value: Any) -> bool:
    if isinstance(value, dict):
        return "role" in value
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _like_encode(value: Any, budget: Any, processor: Any = None, max_text_tokens: int | None = None) -> Any:
    """One sentence-transformers input converted as ``SLQModel.encode`` converts it (chat messages unchanged): the
    image shrunk to the processor's budget, the text cut to the model's text budget."""
    if _is_message(value):
        return value
    return sentence_transformers_input(limit_text(processor, to_item(value, budget=budget), max_text_tokens))


def _preprocess_like_encode(module: Any, inputs: Any, *args, **kwargs) -> Any:
    budget = image_budget(module.processor)
    max_text_tokens = getattr(getattr(module.model, "config", None), "max_text_tokens", None)
    return type(module).preprocess(
        module, [_like_encode(value, budget, module.processor, max_text_tokens) for value in inputs], *args, **kwargs)


def _encode_naming_the_input(model: Any, inputs: Any, *args, **kwargs) -> Any:
    """``SentenceTransformer.encode``; on a bad input, the error names its position in ``inputs``.

    sentence-transformers sorts the inputs by length before preprocessing them, so the preprocessing error cannot
    know the position: on that (rare) path every input is checked again, in order, with its index.
    """
    try:
        return type(model).encode(model, inputs, *args, **kwargs)
    except SLQInputError:
        # sentence-transformers' own rule for one input vs a batch: tuples, datasets Columns and string arrays are
        # batches too, and indexing them as one input would blame the batch itself ("Nested tuple (input 0)").
        if model.is_singular_input(inputs):
            values = [inputs]
        else:
            values = inputs.tolist() if hasattr(inputs, "tolist") else list(inputs)
        budget = image_budget(model[0].processor)
        for index, value in enumerate(values):
            if not _is_message(value):
                to_item(value, index, budget, lazy=True)  # raises for the first bad input, naming its index
        raise


def use_encode_input_handling(model: SentenceTransformer) -> SentenceTransformer:
    """Make ``model.encode`` (and training through it) take inputs exactly as ``SLQModel.encode`` does.

    sentence-transformers otherwise opens image paths with its own decoder (an animated GIF path fails with "too many
    values to unpack"), does not apply EXIF orientation to PIL images, crashes on zero-size images
    (ZeroDivisionError), embeds empty strings and missing paths as text, and does not bound decoding cost. After this
    call every input goes through slq_hf's validation and conversion first: SLQInputError for bad inputs, RGB images
    (first frame, EXIF-transposed, shrunk to the processor's budget), texts cut to the model's ``max_text_tokens``,
    images sized by the model's image budget (also one given at load time through ``model_kwargs``), the same path
    rule as ``encode``; errors name the input's position. Chat-message
    inputs are passed through unchanged. Returns ``model`` (changed in place; the change is not saved with it).
    """
    module = model[0]
    config = getattr(module.model, "config", None)
    if all(hasattr(config, name) for name in BUDGET_FIELDS):
        # The module loads its own processor from the folder's files, so budgets given at load time
        # (model_kwargs={"max_image_tokens": ...}) reach only the model's processor: size images like encode.
        module.processor = processor_with_budgets(module.processor, *(getattr(config, n) for n in BUDGET_FIELDS))
    if not isinstance(module.__dict__.get("preprocess"), functools.partial):
        # A partial of a module-level function (not a closure) so the model still pickles for multi-process pools.
        module.preprocess = functools.partial(_preprocess_like_encode, module)
    if not isinstance(model.__dict__.get("encode"), functools.partial):  # encode_query/_document go through it too
        model.encode = functools.partial(_encode_naming_the_input, model)
    return model


def to_sentence_transformer(
    model: SLQModel,
    save_directory: str | os.PathLike | None = None,
    *,
    prompts: dict[str, str] | None = None,
    **kwargs,
) -> SentenceTransformer:
    """Wrap an in-memory ``SLQModel`` as a ``SentenceTransformer`` that shares its backbone.

    The model is saved (queries, config, processor, sentence-transformers files: a few hundred KB) to
    ``save_directory`` and loaded back with ``backbone=model.backbone``, so the backbone weights are not copied. The
    returned model starts from ``model``'s queries but holds its own copy of them: train the returned model (e.g.
    with ``SentenceTransformerTrainer``) and save it with its ``save_pretrained``, which writes a queries-only SLQ
    folder again.

    Args:
        model: an SLQ model, e.g. from ``SLQModel.from_backbone``; it needs a processor.
        save_directory: where to write the folder; when None, a new temporary directory that is not deleted (it is
            the returned model's ``name_or_path``).
        prompts: sentence-transformers prompts by name; default ``{"query": "", "document": ""}`` (the paper uses
            no instruction). A non-empty prompt is rendered as a system message.
        **kwargs: other ``SentenceTransformer`` arguments (``device``, ``truncate_dim``, ``model_kwargs``...).
    """
    _require_sentence_transformers()
    if not isinstance(model, SLQModel):
        raise TypeError(f"to_sentence_transformer expects an SLQModel, got {type(model).__name__}.")
    if model.processor is None:
        raise ValueError("The SLQModel has no processor; pass processor= to SLQModel.from_backbone/from_pretrained so "
                         "sentence-transformers can build prompts.")
    if save_directory is None:
        save_directory = tempfile.mkdtemp(prefix="slq_st_")
    model.save_pretrained(save_directory)
    if prompts is not None:
        write_sentence_transformers_files(save_directory, prompts=prompts)
    model_kwargs = dict(kwargs.pop("model_kwargs", None) or {})
    model_kwargs.setdefault("processor", model.processor)
    # Stay where the backbone already is, instead of the device sentence-transformers would pick on its own.
    kwargs.setdefault("device", str(model.device))
    return load_sentence_transformer(save_directory, backbone=model.backbone, model_kwargs=model_kwargs, **kwargs)


__all__ = ["is_sentence_transformers_available", "load_sentence_transformer", "to_sentence_transformer",
           "use_encode_input_handling"]
