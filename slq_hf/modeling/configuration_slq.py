"""SLQConfig: the few numbers that define an SLQ embedding model on top of a frozen backbone.

This file ships inside every saved checkpoint (remote code): it may import only torch, transformers and sibling
modules of ``slq_hf/modeling``.
"""

from __future__ import annotations

import copy
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from .budgets import check_budgets
from .version import SLQ_HF_VERSION

POOLING_CHOICES = ("mean", "last")
QUERY_INIT_CHOICES = ("normal", "vocab")
TRAINING_PATH_CHOICES = ("prefix_cache", "full")
_CHOICES = {"pooling": POOLING_CHOICES, "query_init": QUERY_INIT_CHOICES, "training_path": TRAINING_PATH_CHOICES}


# Keys that are not SLQConfig fields but that transformers itself writes into, or consumes from, config.json.
_TRANSFORMERS_KEYS = frozenset({
    "model_type", "auto_map", "custom_pipelines", "torch_dtype", "name_or_path", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "num_labels", "quantization_config",
    "rope_scaling", "rope_theta",
    # transformers' Trainer (and so SentenceTransformerTrainer) copies the tokenizer's special ids into model.config
    # before training (align_special_tokens); the saved config then carries them. SLQ does not use them.
    "bos_token_id", "eos_token_id", "pad_token_id",
})


def _generation_keys() -> frozenset[str]:
    # PretrainedConfig silently pops generation parameters from old configs; they are not SLQ keys either way.
    try:
        from transformers import GenerationConfig

        return frozenset(GenerationConfig._get_default_generation_params())
    except Exception:  # private helper: if it moves, unknown generation keys merely trigger the warning
        return frozenset()


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.2.0.dev1' -> (0, 2, 0): the numeric release part, enough to tell an older release from a newer one."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


# What SLQConfig.from_dict was built from, per config object (by id; the entry goes with the object): the
# config.json content, the load keywords naming SLQConfig fields, the field values right after loading and the load
# keywords meant for the backbone. Kept off the config's attributes so that it is never saved and never makes two
# equal configs compare unequal.
_READ_FROM: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
# Load keywords that transformers' from_dict consumes into the config (so AutoModel never passes them on) but that
# SLQ forwards to the backbone's from_pretrained: the SLQ model itself has no attention.
BACKBONE_CONFIG_KEYWORDS = ("attn_implementation",)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"SLQConfig: `{name}`={value!r} is invalid; expected {allowed}.")


class SLQConfig(PretrainedConfig):
    """Configuration of an SLQ model.

    Args:
        backbone_name_or_path: Hub id or local path of the frozen vision-language backbone. Pinned in config.json so
            ``AutoModel.from_pretrained(slq_dir)`` can rebuild the backbone; override it at load time with
            ``backbone_name_or_path=`` (e.g. a local mirror).
        backbone_revision: Hub revision (branch, tag or commit) of the backbone, pinned next to the id.
        backbone_model_type: ``model_type`` of the backbone (filled in by ``SLQModel.from_backbone``).
        num_queries: number of latent query vectors appended after every prompt (paper default: 40).
        hidden_size: width of each query = the backbone's embedding width (taken from the backbone).
        pooling: ``"mean"`` over the query positions (paper) or ``"last"`` (last query only).
        normalize: L2-normalise the pooled embedding.
        query_init: ``"normal"`` (std of the backbone's input embeddings) or ``"vocab"`` (rows sampled from the
            backbone's embedding matrix).
        temperature: initial softmax temperature of the contrastive loss (learnable, stored as log(1/t)).
        projection_size: ``None`` (paper: no head) or the output width of a trainable linear head after pooling.
            Also accepted as ``projection_dim=`` (the name configs before 0.2 stored); reading
            ``config.projection_dim`` gives the embedding width either way, which is what sentence-transformers and
            CLIP-style code expect that attribute to mean.
        training_path: ``"prefix_cache"`` (prompt under no_grad with a KV cache, queries with grad) or ``"full"``.
        placeholder_token_id: id appended for each query slot before the embedding hook replaces its row; chosen
            from the backbone so that it is never a multimodal special token.
        max_image_tokens / min_image_tokens: image tokens (after the vision merger) an image may take; images are
            sized by the backbone processor's own rule inside this range (``budgets.py``). None: the processor's own
            setting (configs written before 0.2). ``from_backbone`` fills in retrieval defaults.
        max_text_tokens: tokens of the user text kept (longer texts are cut, the chat template kept); None: no limit.
    """

    model_type = "slq"

    # Declared as dataclass fields (transformers 5 style): declared fields such as `temperature` are not mistaken for
    # generation parameters when the config is saved.
    backbone_name_or_path: str | None = None
    backbone_revision: str | None = None
    backbone_model_type: str | None = None
    num_queries: int = 40
    hidden_size: int | None = None
    pooling: str = "mean"
    normalize: bool = True
    query_init: str = "normal"
    temperature: float = 0.07
    projection_size: int | None = None
    training_path: str = "prefix_cache"
    placeholder_token_id: int | None = None
    # Budgets the queries were trained with (budgets.py); None = the backbone processor's own / no limit.
    max_image_tokens: int | None = None
    min_image_tokens: int | None = None
    max_text_tokens: int | None = None
    # Library versions that wrote config.json: stamped by `to_dict` on every save, compared with ours on load.
    slq_hf_version: str | None = None
    torch_version: str | None = None

    def __post_init__(self, **kwargs):
        written = self.slq_hf_version
        if written is not None and not isinstance(written, str):
            raise ValueError(f"SLQConfig: `slq_hf_version`={written!r} is invalid; expected a version string.")
        if written is not None and _version_tuple(written) > _version_tuple(SLQ_HF_VERSION):
            warnings.warn(
                f"This SLQ config was written by slq_hf {written}, but slq_hf {SLQ_HF_VERSION} is installed. Newer "
                "releases may store options this one ignores; upgrade slq_hf (pip install -U slq_hf) if loading "
                "fails or embeddings differ.",
                UserWarning,
                stacklevel=2,
            )
        if "projection_dim" in kwargs:  # the earlier name of projection_size (config.json written before 0.2)
            legacy = kwargs.pop("projection_dim")
            _check_positive_int("projection_dim", legacy, allow_none=True)
            if self.projection_size is not None and legacy not in (None, self.projection_size):
                raise ValueError(f"SLQConfig: `projection_dim`={legacy!r} and `projection_size`="
                                 f"{self.projection_size!r} disagree; give only projection_size.")
            self.projection_size = self.projection_size if legacy is None else legacy
        kwargs = self._drop_unknown_keys(kwargs)
        for name in ("num_queries", "hidden_size", "projection_size"):
            _check_positive_int(name, getattr(self, name), allow_none=name != "num_queries")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SLQConfig: `{name}`={getattr(self, name)!r} is not supported; allowed values are "
                                 f"{list(allowed)}.")
        check_budgets(self.max_image_tokens, self.min_image_tokens, self.max_text_tokens)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"SLQConfig: `normalize`={self.normalize!r} is invalid; expected True or False.")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 1:
            raise ValueError(f"SLQConfig: `temperature`={temperature!r} is invalid; expected a number in (0, 1].")
        self.temperature = float(temperature)
        for name in ("backbone_name_or_path", "backbone_revision", "backbone_model_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"SLQConfig: `{name}`={getattr(self, name)!r} is invalid; expected a string (a Hub "
                                 "id or local path, a revision, a model type) or None.")
        super().__post_init__(**kwargs)

    def _drop_unknown_keys(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Drop keys that no SLQConfig field or transformers itself knows: most likely options of a newer slq_hf.

        Keeping them as attributes (transformers' default) would pretend they have an effect; dropping them loudly
        tells the user that this release cannot honour them.
        """
        generation_keys = _generation_keys()
        unknown = sorted(k for k in kwargs
                         if k not in _TRANSFORMERS_KEYS and k not in generation_keys and not k.startswith("_"))
        if unknown:
            written = f" (written by slq_hf {self.slq_hf_version})" if self.slq_hf_version else ""
            warnings.warn(
                f"SLQConfig: ignoring unknown config key(s) {unknown}{written}. This slq_hf {SLQ_HF_VERSION} does not "
                "know them; they probably come from a newer slq_hf. Upgrade slq_hf (pip install -U slq_hf) to use "
                "them.",
                UserWarning,
                stacklevel=3,
            )
        return {k: v for k, v in kwargs.items() if k not in unknown}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """transformers' ``from_dict`` (AutoConfig and ``from_pretrained`` build through it), remembering what the
        config was read from, for :func:`changes_since_read`."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"SLQConfig: config.json holds a {type(config_dict).__name__}, not a JSON object of "
                             "settings; re-save the model.")
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"SLQConfig: config.json is of a {config_dict['model_type']!r} model, not an SLQ one "
                             "(model_type 'slq'); load it with its own class, or pick the SLQ folder.")
        read = copy.deepcopy(config_dict)
        # Field keywords (AutoModel.from_pretrained(dir, pooling=...) lands here) go in at construction, so they are
        # validated like config.json's own values; transformers would setattr them unchecked.
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in SLQ_FIELDS or k == "projection_dim"}
        backbone = {k: kwargs[k] for k in BACKBONE_CONFIG_KEYWORDS if k in kwargs}
        result = super().from_dict({**config_dict, **overrides}, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        _READ_FROM[id(config)] = (read, overrides, config.field_values(), backbone)
        weakref.finalize(config, _READ_FROM.pop, id(config), None)
        return result

    def field_values(self) -> dict[str, Any]:
        """{field name: value} of every SLQConfig field."""
        return {k: getattr(self, k) for k in SLQ_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Serialise, stamping the slq_hf and torch versions of the writer (transformers stamps its own)."""
        output = super().to_dict()
        output["slq_hf_version"] = SLQ_HF_VERSION
        output["torch_version"] = str(torch.__version__)
        return output

    @property
    def embedding_dim(self) -> int | None:
        """Width of the output embedding: ``projection_size`` if a head is configured, else ``hidden_size``."""
        return self.projection_size or self.hidden_size

    @property
    def projection_dim(self) -> int | None:
        """The embedding width (= :attr:`embedding_dim`): sentence-transformers' ``get_embedding_dimension`` reads
        ``config.projection_dim`` before ``hidden_size``. Whether a head exists is ``projection_size``."""
        return self.embedding_dim


SLQ_FIELDS = tuple(SLQConfig.__annotations__)


def changes_since_read(config: SLQConfig, read_config_dict: Callable[[], dict[str, Any]]
                       ) -> tuple[bool, dict[str, Any]] | None:
    """None when ``config`` was built in code. Otherwise (read from a config.json): whether it was read from exactly
    what ``read_config_dict()`` returns now (the content of the config.json being loaded; it differs when the folder
    was re-saved since), and the changes made to it on top of what it read - the load keywords (``pooling=``...) and
    later edits of its fields - to check, and to re-apply to a config built from the current content.
    """
    record = _READ_FROM.get(id(config))
    if record is None:
        return None
    read, overrides, at_read, _ = record
    return read == read_config_dict(), {**overrides, **{k: v for k, v in config.field_values().items()
                                                        if v != at_read[k]}}


def backbone_keywords(config: SLQConfig | None) -> dict[str, Any]:
    """Load keywords of ``config``'s from_dict that are meant for the backbone (``BACKBONE_CONFIG_KEYWORDS``)."""
    record = _READ_FROM.get(id(config))
    return dict(record[3]) if record else {}
