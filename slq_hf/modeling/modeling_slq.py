"""SLQModel: a frozen vision-language backbone + named sets of trainable latent queries = an embedding model.

Encode data flow: processed prompt (B, L) -> re-laid to left padding -> N_q placeholder ids appended -> the
backbone's own base-model forward, where a hook on the input-embedding layer swaps the placeholder rows for the
queries -> last_hidden_state[:, -N_q:] -> pool -> (optional head) -> L2 normalise. Several query sets are K blocks of
the same pass: the prompt runs once into a KV cache and every set reads it (``prefix_cache.py``).

Ships inside every saved checkpoint (remote code): imports only torch, transformers, safetensors, PIL, tqdm and
sibling modules.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput, cached_file
from transformers.utils import logging as hf_logging

from .backbones import backbone_spec, block_mask_allowed, embedding_rows, usable_token_ids
from .budgets import AUTO, DEFAULT_MAX_TEXT_TOKENS, processor_with_budgets, resolve_image_budget, with_overrides
from .checkpoint import (
    CONFIG_NAME,
    DEFAULT_QUERY_SET,
    MAX_LOGIT_SCALE,
    QUERY_SET_TENSOR,
    QUERY_SETS_DIR,
    QUERY_SETS_INDEX,
    SLQ_TENSOR_NAMES,
    WEIGHTS_METADATA,
    WEIGHTS_NAME,
    CheckpointError,
    check_config_for_backbone,
    check_query_set_name,
    check_query_set_target,
    expected_tensors,
    max_queries,
    query_set_file,
    read_folder,
    read_header,
    read_query_set_index,
    read_tensors,
    save_tensors,
    write_folder,
)
from .configuration_slq import SLQ_FIELDS, SLQConfig, backbone_keywords, changes_since_read
from .latent_queries import LatentQueries
from .losses import symmetric_infonce
from .pickling import register_output_recorders, without_capture_hooks
from .positions import sequence_position_ids
from .prefix_cache import prefix_cache_query_states
from .processing_slq import SLQInput, collate, encode_batches, image_budget, prompt_length_limit, to_items
from .processor_files import save_processor
from .sentence_transformers_files import write_sentence_transformers_files

logger = hf_logging.get_logger(__name__)

# Hub arguments that locate the SLQ folder itself; the backbone gets its own revision from the config.
_AUTO_CLASS_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                      "_commit_hash")
_SHARED_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")
# from_pretrained keywords naming SLQConfig fields override the saved config; these cannot change after training.
_CONFIG_FIELDS = frozenset(SLQ_FIELDS) | {"projection_dim"}
_FIXED_FIELDS = ("num_queries", "hidden_size", "projection_size", "projection_dim", "backbone_model_type",
                 "temperature")
_FIXED_HINTS = {"temperature": " The learned temperature is logit_scale in model.safetensors; to change it, set "
                               "model.logit_scale after loading."}
PAIR_SIDES = ("positive", "negative")


@dataclass
class SLQModelOutput(ModelOutput):
    """Output of ``SLQModel.forward``.

    Attributes:
        loss: () symmetric InfoNCE over the batch (mean over the query sets) for a pair batch with ``return_loss``.
        pooler_output: (B, embedding_dim) float32 embeddings of the active set (or the first set asked for).
        query_states: (B, N_q, H) final hidden states at that set's query positions.
        accuracy: () in-batch retrieval accuracy of that set's contrastive step, when a loss was computed.
        positive_pooler_output: (B, embedding_dim) that set's embeddings of the positive side of a pair batch.
        pooler_outputs / losses / accuracies / positive_pooler_outputs: set name -> the same per set, when the call
            named query sets (``query_sets=[...]`` or ``model.joint_query_sets``).
    """

    loss: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    query_states: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    positive_pooler_output: torch.FloatTensor | None = None
    pooler_outputs: dict[str, torch.Tensor] | None = None
    losses: dict[str, torch.Tensor] | None = None
    accuracies: dict[str, torch.Tensor] | None = None
    positive_pooler_outputs: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class _Injection:
    shape: tuple[int, int]  # (B, L + N_q) of the ids the hook must act on
    queries: torch.Tensor  # (N_q, H)


# Queries to inject, per thread / asyncio task and per embedding layer: {id(layer): _Injection}. Set and reset around
# one backbone call, so a concurrent call, a later generate or a call after an exception never sees another call's.
_INJECTIONS: ContextVar[dict[int, _Injection] | None] = ContextVar("slq_injections", default=None)


def _inject_queries(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the backbone's input-embedding layer: swap the query slots' rows for the queries of the SLQ
    call in progress in this thread. A plain function, registered once per layer, so several SLQModels can share a
    backbone (its layer holds no reference to any of them: a discarded one is freed, pickling one carries no other)."""
    injection = (_INJECTIONS.get() or {}).get(id(module))
    if injection is None:
        return None  # inert outside an SLQ call (backbone.generate, other threads)
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
    # Some backbones embed other ids internally (Qwen3-VL embeds a scalar id): only touch the prompt itself.
    if ids is None or tuple(ids.shape) != injection.shape:
        return None
    num = injection.queries.shape[0]
    queries = injection.queries.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)  # (B, N_q, H)
    return torch.cat([output[:, :-num], queries], dim=1)  # (B, L + N_q, H)
# A fast tokenizer sets its padding/truncation state on the shared object at every call, so two threads tokenizing
# at once (one model, or two sharing a processor) can get each other's settings: processor calls take turns.
_PROCESSOR_LOCK = threading.Lock()


class SLQModel(PreTrainedModel):
    """Frozen vision-language backbone with named sets of trainable latent queries appended to every prompt.

    Build one with :meth:`from_backbone` (fresh queries) or :meth:`from_pretrained` (a saved SLQ folder). Only the
    query sets, ``logit_scale`` and the optional ``projection`` head are trainable and saved.
    """

    config_class = SLQConfig
    base_model_prefix = "slq"
    supports_gradient_checkpointing = False
    accepts_loss_kwargs = False  # the Trainer must hand our own loss through (it is computed inside forward)
    _supports_sdpa = True
    _supports_flash_attn = True
    #: Sets that ``forward`` trains jointly on a pair batch when no ``query_sets=`` is given, so the plain Trainer
    #: (which calls ``forward(**batch)``) trains several sets on one prompt pass per side.
    joint_query_sets: list[str] | None = None
    #: Default ``encode(max_batch_tokens=)``: at most this many padded prompt tokens per forward (None: count only).
    #: A runtime setting (not saved), so paths that call ``encode`` for you (evaluation, index building) use it too.
    max_batch_tokens: int | None = None

    def __init__(self, config: SLQConfig, backbone: PreTrainedModel | None = None, processor: Any = None):
        if backbone is None:
            backbone = _load_backbone(config.backbone_name_or_path, config.backbone_revision)
        spec = backbone_spec(backbone.config.model_type)
        embedding = backbone.get_input_embeddings()
        rows, hidden = embedding.weight.shape
        # Before anything is allocated: a config that does not fit this backbone fails here, naming both.
        check_config_for_backbone(config, backbone.config, vocab_size=rows, source=config.backbone_name_or_path)
        config.hidden_size, config.backbone_model_type = hidden, backbone.config.model_type
        usable = usable_token_ids(backbone.config, rows, getattr(processor, "tokenizer", processor))
        if config.placeholder_token_id is None:
            config.placeholder_token_id = int(usable[0])
        super().__init__(config)

        device = embedding.weight.device
        sample = embedding_rows(embedding, usable, num_samples=max(2048, config.num_queries))  # (S, H)
        self.latent_queries = LatentQueries(hidden, config.num_queries, sample, config.query_init,
                                            source=repr(config.backbone_name_or_path), device=device,
                                            max_queries=max_queries(backbone.config))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature), device=device))
        self.projection = nn.Linear(hidden, config.projection_size, device=device) if config.projection_size else None
        # post_init before the backbone is attached, so transformers' weight init never touches backbone weights.
        self.post_init()
        self.backbone = backbone.requires_grad_(False)
        # Before any call (encode, rerank): one 4-bit kernel for every call; switching later moved embeddings ~1e-2.
        _keep_4bit_layers_differentiable(backbone)
        # The budgets the queries are trained/used with, applied to the processor once (budgets.py).
        self.spec, self.processor = spec, processor_with_budgets(
            processor, config.max_image_tokens, config.min_image_tokens, config.max_text_tokens)
        if not any(hook is _inject_queries for hook in embedding._forward_hooks.values()):  # one per backbone
            embedding.register_forward_hook(_inject_queries, with_kwargs=True)

    def _init_weights(self, module: nn.Module) -> None:
        # Queries are drawn by LatentQueries from the backbone's embeddings; the head is the only other module.
        if isinstance(module, nn.Linear) and module is getattr(self, "projection", None):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        num_queries: int = 40,
        *,
        processor: Any = None,
        revision: str | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        query_init: str = "normal",
        temperature: float = 0.07,
        projection_dim: int | None = None,
        training_path: str = "prefix_cache",
        max_image_tokens: int | str | None = AUTO,
        min_image_tokens: int | str | None = AUTO,
        max_text_tokens: int | str | None = AUTO,
        **backbone_kwargs,
    ) -> SLQModel:
        """Attach fresh latent queries to a frozen backbone.

        Args:
            backbone: Hub id, local path (pinned as an absolute path), or a loaded ``*ForConditionalGeneration``.
            num_queries: number of latent queries N_q of the default set.
            processor: the backbone's processor; loaded from ``backbone`` when it has one. Without one, ``forward``,
                training on processed batches and saving work; ``encode`` asks for it.
            revision: Hub revision of the backbone, pinned in the config.
            projection_dim: output width of an optional trainable linear head (``SLQConfig.projection_size``).
            max_image_tokens / min_image_tokens / max_text_tokens: budgets saved with the queries (``budgets.py``);
                ``"auto"``: retrieval defaults (Qwen-VL 4-1,800 image tokens, never above the backbone's own; 8,192
                text tokens), None: the backbone processor's own setting / no text limit.
            **backbone_kwargs: go to the backbone's ``from_pretrained`` (``dtype``, ``device_map``,
                ``quantization_config``, ``attn_implementation``, ...).
        """
        loaded = isinstance(backbone, PreTrainedModel)
        name = _pin((backbone.config._name_or_path or backbone.name_or_path) if loaded else str(backbone))
        # The config is validated first, so a bad option fails before a multi-GB backbone is loaded.
        text_tokens = DEFAULT_MAX_TEXT_TOKENS if max_text_tokens == AUTO else max_text_tokens
        config = SLQConfig(backbone_name_or_path=name or None, backbone_revision=revision, num_queries=num_queries,
                           pooling=pooling, normalize=normalize, query_init=query_init, temperature=temperature,
                           projection_size=projection_dim, training_path=training_path, max_text_tokens=text_tokens,
                           **{k: v for k, v in (("max_image_tokens", max_image_tokens),
                                                ("min_image_tokens", min_image_tokens)) if v != AUTO})
        if loaded and backbone_kwargs:
            raise ValueError(f"Backbone arguments {sorted(backbone_kwargs)} were given with an already loaded "
                             "backbone; load the backbone with them yourself, or pass its id/path instead.")
        model = backbone if loaded else _load_backbone(name, revision, **backbone_kwargs)
        if processor is None and name:
            processor = try_processor(name, revision=revision)
        if processor is not None:
            config.max_image_tokens, config.min_image_tokens = resolve_image_budget(
                processor, max_image_tokens, min_image_tokens)
        return cls(config, backbone=model, processor=processor)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: SLQConfig | None = None,
        backbone_name_or_path: str | os.PathLike | None = None,
        backbone: PreTrainedModel | None = None,
        processor: Any = None,
        **kwargs,
    ) -> SLQModel:
        """Load a saved SLQ folder (or Hub repo): the pinned backbone plus the saved query sets.

        Args:
            pretrained_model_name_or_path: folder or Hub id written by :meth:`save_pretrained`.
            backbone_name_or_path: load the backbone from here instead of the one pinned in config.json, at
                ``backbone_revision=`` (default: none; the pinned revision belongs to the pinned id).
            backbone: an already loaded backbone to reuse (no second copy of the weights).
            **kwargs: SLQConfig fields override the saved config (``pooling=``, ``normalize=``, ``training_path=``;
                ``num_queries`` / ``hidden_size`` / ``projection_dim`` / ``temperature`` are fixed by training and
                raise; the same through ``AutoModel``); hub
                arguments for the SLQ folder (``revision``, ``subfolder``, ``token``...); the rest goes to the
                backbone's ``from_pretrained`` (``dtype``, ``device_map``, ``quantization_config``...).
        """
        path = pretrained_model_name_or_path
        for key in _AUTO_CLASS_KWARGS:
            kwargs.pop(key, None)
        loading_info = kwargs.pop("output_loading_info", False)  # transformers' (model, info); not the backbone's
        shared = {k: kwargs.pop(k) for k in _SHARED_HUB_KWARGS if k in kwargs}
        location = {"revision": kwargs.pop("revision", None), "subfolder": kwargs.pop("subfolder", ""), **shared}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
        kwargs = {**backbone_keywords(config), **kwargs}  # AutoModel's config read took them from the keywords

        # A given backbone bounds the query sets' sizes from their headers (one pinned by the folder is loaded after
        # the read, which every file's 1 GiB cap bounds meanwhile; LatentQueries then checks the positions).
        limit = None if backbone is None else max_queries(backbone.config)

        def read() -> tuple[SLQConfig, SLQConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, Any], Any]:
            base, saved, changes = _config_of_this_save(config, path, location)
            state = read_tensors(_resolve_weights(path, location),
                                 expected_tensors(saved.num_queries, saved.hidden_size, saved.projection_size))
            found = None if processor is not None else try_processor(path, quiet=True, **location)
            return base, saved, changes, state, _read_query_sets(path, location, saved.hidden_size, limit), found

        # One save of the folder, never a mix of two.
        base, saved, changes, state, sets, found = read_folder(path, read)
        load = {**changes, **overrides}
        backbone_name_or_path = backbone_name_or_path or load.get("backbone_name_or_path")
        if backbone_name_or_path:  # another copy of the backbone: the saved revision is the pinned one's, not its
            load.update(backbone_name_or_path=_pin(str(backbone_name_or_path)),
                        backbone_revision=load.get("backbone_revision"))
        saved = _with_overrides(base, load, path, saved)
        if backbone is None:
            backbone = _load_backbone(saved.backbone_name_or_path, saved.backbone_revision,
                                      folder=None if backbone_name_or_path else path, **shared, **kwargs)
        elif kwargs:
            raise ValueError(f"Backbone arguments {sorted(kwargs)} were given with an already loaded backbone.")
        trained_on, running = saved.backbone_model_type, backbone.config.model_type
        if trained_on and trained_on != running:  # only the width is a hard fact (checked in __init__)
            logger.warning(f"{path}: these queries were trained on a {trained_on!r} backbone but the backbone loaded "
                           f"is a {running!r} one; its embeddings will be meaningless. Load the backbone they were "
                           "trained on (backbone_name_or_path=).")
        processor = processor or found or try_processor(saved.backbone_name_or_path, saved.backbone_revision,
                                                         **shared)
        model = cls(saved, backbone=backbone, processor=processor)
        model.load_trainable_state(state, source=f"{path}/{WEIGHTS_NAME}")
        for name, queries in sets["sets"].items():
            model.latent_queries.replace(name, queries, f"{path}/{query_set_file(name)}")
        model.latent_queries.set_active(sets["active"])
        info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}  # all checked
        return (model.eval(), info) if loading_info else model.eval()

    # ------------------------------------------------------------------------------------------------ saving
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``model.safetensors``: the default set as ``queries``, ``logit_scale``, the optional head."""
        state = {QUERY_SET_TENSOR: self.queries, "logit_scale": self.logit_scale}
        if self.projection is not None:
            state.update({"projection.weight": self.projection.weight, "projection.bias": self.projection.bias})
        return state

    def load_trainable_state(self, path_or_state: str | os.PathLike | dict[str, torch.Tensor],
                             source: str | None = None) -> None:
        """Load queries (+ temperature, head) from a safetensors file or a state dict, checking every tensor."""
        expected = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}
        if not isinstance(path_or_state, dict):
            state = read_tensors(path_or_state, expected)
        else:  # an in-memory state dict is checked by the same code as a file; errors name ``source``
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / WEIGHTS_NAME
                save_tensors(path_or_state, file)
                try:
                    state = read_tensors(file, expected)
                except CheckpointError as err:
                    raise CheckpointError(str(err).replace(str(file), source or "state dict")) from None
        with torch.no_grad():
            for name, param in self.trainable_state_dict().items():
                param.copy_(state[name].to(dtype=param.dtype, device=param.device))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Accept full, queries-only or pre-0.2 state dicts (Trainer resume): backbone keys are never required.
        ``strict=False`` ignores unknown keys and keeps the current value of missing trainable tensors."""
        own = {k.replace("extra_query_sets.", "latent_queries."): v  # pre-0.2 names of the extra sets
               for k, v in state_dict.items() if not k.startswith("backbone.")}
        sets = {k.split(".", 1)[1]: own.pop(k) for k in list(own)
                if k.startswith("latent_queries.") and k != "latent_queries.default"}
        for name, queries in sets.items():  # every entry is checked before anything changes
            check_query_set_name(name)
            rows = self.latent_queries.validate(queries, f"state dict entry {name!r}").shape[0]
            self.latent_queries.check_fits(name, rows)
        own[QUERY_SET_TENSOR] = own.pop("latent_queries.default", own.get(QUERY_SET_TENSOR))
        own = {k: v for k, v in own.items() if v is not None}
        if not strict:  # torch's convention: unknown keys are ignored, missing ones keep their current values
            own = {k: own[k] if k in own else v.detach() for k, v in self.trainable_state_dict().items()}
        self.load_trainable_state(own)  # checks, then copies
        for name, queries in sets.items():
            self.latent_queries.replace(name, queries, f"state dict entry {name!r}")
        kept = [n for n in self.query_sets[1:] if n not in sets]
        if kept and any(self.get_query_set(n).requires_grad for n in kept):
            # The plain Trainer resumes (and loads its best checkpoint) from model.safetensors alone.
            logger.warning(f"load_state_dict: no entries for query sets {kept}; they keep their current values. A "
                           "checkpoint keeps them in query_sets/: SLQTrainer restores them on resume and for the best "
                           "checkpoint; with the plain Trainer call model.load_query_set(checkpoint, name=n, "
                           "query_set=n) for each.")
        return nn.modules.module._IncompatibleKeys([], [])

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True,
                        bundle_processor: bool | None = None, **kwargs) -> None:
        """Write a queries-only SLQ folder, atomically: config.json (auto_map, pinned backbone), model.safetensors
        with the trainable tensors, ``query_sets/`` for extra sets, the model code (``trust_remote_code``), the
        processor files and the sentence-transformers files.

        Extra keyword arguments of ``PreTrainedModel.save_pretrained`` (``state_dict``, ``safe_serialization``,
        ``max_shard_size``, ...) are accepted and ignored: only trainable tensors are written, always as safetensors.
        ``push_to_hub=True`` then uploads through ``push_to_hub(repo_id)`` (``repo_id`` defaults to the folder's name),
        which saves through this method, so only queries ever go up.
        The processor is not copied when the backbone is a Hub id pinned to a revision (``processor_files.py``);
        ``bundle_processor=True`` copies it anyway (offline use).
        """
        if not is_main_process:
            return

        def write(out: Path) -> None:
            self.config.architectures = [type(self).__name__]
            custom_object_save(self, out, config=self.config)  # modeling_slq.py + siblings, auto_map["AutoModel"]
            self.config.save_pretrained(out)  # + configuration_slq.py, auto_map["AutoConfig"]
            state = {k: v.float() for k, v in self.trainable_state_dict().items()}  # float32 after model.to(bf16) too
            save_tensors(state, out / WEIGHTS_NAME, WEIGHTS_METADATA)
            extra = self.query_sets[1:]
            active = self.latent_queries.model_active  # not a use_query_set block's temporary choice
            if extra or active != DEFAULT_QUERY_SET:
                (out / QUERY_SETS_DIR).mkdir()
                for name in extra:
                    self.save_query_set(name, out / query_set_file(name))
                sets = {n: {"file": query_set_file(n), "num_queries": self.get_query_set(n).shape[0]} for n in extra}
                index = {"active": active, "sets": sets}
                (out / QUERY_SETS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            # Every SLQ folder is also a sentence-transformers model; max_seq_length makes it truncate like encode.
            write_sentence_transformers_files(out, max_seq_length=self.max_prompt_length())
            save_processor(self.processor, out, self.config, bundle_processor)

        write_folder(save_directory, write)
        if kwargs.get("push_to_hub"):  # transformers uploads here; ignoring it would leave the Hub silently stale
            hub = {k: kwargs[k] for k in ("commit_message", "private", "token", "create_pr", "revision")
                   if k in kwargs}
            self.push_to_hub(kwargs.get("repo_id") or Path(os.path.abspath(save_directory)).name, **hub)

    # ----------------------------------------------------------------------------------------------- query sets
    @property
    def queries(self) -> nn.Parameter:
        """(num_queries, H) float32 queries of the ``"default"`` set (``"queries"`` in model.safetensors)."""
        return self.latent_queries[DEFAULT_QUERY_SET]

    @property
    def query_sets(self) -> list[str]:
        """Names of the model's query sets, ``"default"`` first."""
        return self.latent_queries.names

    @property
    def active_query_set(self) -> str:
        """The set used when none is named (this thread's :meth:`use_query_set` block, else the model's)."""
        return self.latent_queries.active

    @property
    def active_queries(self) -> nn.Parameter:
        """(N_q, H) queries of the active set."""
        return self.latent_queries.lookup(self.active_query_set)

    def get_query_set(self, name: str) -> nn.Parameter:
        """(N_q, H) queries of set ``name`` (the trainable parameter itself)."""
        return self.latent_queries.lookup(name)

    def add_query_set(self, name: str, num_queries: int | None = None, *, queries: torch.Tensor | None = None,
                      trainable: bool = True) -> nn.Parameter:
        """Add set ``name``: ``num_queries`` (default ``config.num_queries``) queries drawn like the default set
        (seeded by the name: distinct sets, reproducible per name), or a copy of ``queries`` (N_q, H).

        ``trainable=False`` freezes the set on this model (``requires_grad``); replacing its values
        (``load_query_set``, ``load_state_dict``) keeps that and its place in :attr:`query_sets`. Files hold values
        only, as for any torch parameter: ``from_pretrained`` gives trainable sets (freeze one again with
        ``model.get_query_set(name).requires_grad_(False)``)."""
        if num_queries is None and queries is None:
            num_queries = self.config.num_queries
        return self.latent_queries.add(name, num_queries, queries=queries, trainable=trainable)

    def remove_query_set(self, name: str) -> None:
        """Drop an extra set (not ``"default"``); the active set falls back to ``"default"``."""
        self.latent_queries.remove(name)

    def set_active_query_set(self, name: str) -> None:
        """Make ``name`` the set that ``embed``/``encode``/``forward`` (and so training) use by default."""
        self.latent_queries.set_active(name)

    def use_query_set(self, name: str) -> AbstractContextManager[None]:
        """Context manager: ``name`` is the active set inside the block, for the calling thread only."""
        return self.latent_queries.use(name)

    def query_set_for_task(self, task: str | None) -> str | None:
        """The set a sentence-transformers ``task`` (``"query"``/``"document"``) selects, or None (the active set)."""
        return task if isinstance(task, str) and task in self.latent_queries else None

    def max_query_set_size(self) -> int:
        """Largest N_q over all sets: the positions a prompt must leave free."""
        return self.latent_queries.max_size()

    def save_query_set(self, name: str, path: str | os.PathLike) -> Path:
        """Write set ``name`` alone to ``path``: ``"queries"`` (N_q, H) float32, metadata naming the set and the
        backbone (``load_query_set`` warns when it is loaded onto another backbone type). Returns the path."""
        queries, path = self.get_query_set(name), Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder; save_query_set writes one file, e.g. "
                                    f"{path / (name + '.safetensors')} (save_pretrained writes a whole folder).")
        check_query_set_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**WEIGHTS_METADATA, "slq_query_set": name, "num_queries": str(queries.shape[0]),
                    "hidden_size": str(queries.shape[1]),
                    "backbone_name_or_path": str(self.config.backbone_name_or_path or ""),
                    "backbone_model_type": str(self.config.backbone_model_type or "")}
        save_tensors({QUERY_SET_TENSOR: queries.float()}, path, metadata)
        return path

    def load_query_set(self, path_or_repo: str | os.PathLike, name: str | None = None, *, query_set: str | None = None,
                       **hub_kwargs) -> str:
        """Load a query set onto this model and return the name it was stored under.

        Args:
            path_or_repo: a query-set file (written by :meth:`save_query_set` or ``save_pretrained``), or an SLQ
                folder / Hub repo id.
            name: name on this model; default: the set's own name. An existing set of that name is replaced
                (``"default"`` keeps its N_q).
            query_set: which set of an SLQ folder / repo to load (default ``"default"``: its model.safetensors).
            **hub_kwargs: ``revision``, ``subfolder``, ``token``, ``cache_dir``, ``local_files_only``.
        """
        source, own_name = str(path_or_repo), None
        if Path(source).is_file():
            file = source
        elif _missing_local_path(source):
            raise OSError(f"{source}: no such file or folder on this machine (a query-set file or an SLQ folder).")
        else:
            own_name = query_set or DEFAULT_QUERY_SET
            filename = WEIGHTS_NAME if own_name == DEFAULT_QUERY_SET else query_set_file(own_name)
            file = _optional_file(source, filename, hub_kwargs)
            if file is None:
                raise OSError(f"{source}: no {filename} found; it is neither a query-set file nor an SLQ folder "
                              f"with a query set {own_name!r}.")
        whole, metadata = own_name == DEFAULT_QUERY_SET, read_header(file)[1]
        own_name = metadata.get("slq_query_set") or own_name or Path(file).stem
        if name is None and own_name == DEFAULT_QUERY_SET:
            raise ValueError(f"{source}: this is a model's default set; give it a name on this model, e.g. "
                             "load_query_set(path, name='document') (or name='default' to overwrite ours).")
        name = name or own_name
        queries = _read_queries(file, self.config.hidden_size, whole, limit=self.latent_queries.max_queries, name=name)
        theirs, ours = metadata.get("backbone_model_type"), self.config.backbone_model_type
        if theirs and ours and theirs != ours:  # only the width is a hard fact; another id may be a mirror of ours
            logger.warning(f"{file}: this query set was trained on a {theirs!r} backbone but this model runs a "
                           f"{ours!r} backbone of the same width; its embeddings will be meaningless.")
        self.latent_queries.replace(name, queries, file)
        return name

    # ------------------------------------------------------------------------------------------------ forward
    @contextmanager
    def _inject(self, shape: tuple[int, int], queries: torch.Tensor) -> Iterator[None]:
        key = id(self.backbone.get_input_embeddings())
        token = _INJECTIONS.set({**(_INJECTIONS.get() or {}), key: _Injection(tuple(shape), queries)})
        try:
            yield
        finally:
            _INJECTIONS.reset(token)

    def _relay_left(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict[str, Any],
                    num_queries: int):
        """Move every row's padding to the left (stable sort on the mask) and append ``num_queries`` query slots.

        Returns ids (B, L + N_q), mask (B, L + N_q) and the per-token extras (``spec.token_keys``) re-laid and
        zero-extended.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() \
                or input_ids.numel() == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor of token ids with at least one token, got "
                             f"{shape} {getattr(input_ids, 'dtype', '')}; build batches with the backbone's "
                             "processor.")
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}.")
        order = torch.sort(attention_mask.long(), dim=1, stable=True).indices  # (B, L): pads first, order kept

        def extend(value: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.cat([value.gather(1, order), value.new_full((batch, num_queries), fill)], dim=1)

        relaid = {k: extend(v, 0) for k in self.spec.token_keys
                  if isinstance(v := extra.get(k), torch.Tensor) and v.shape == (batch, length)}
        return extend(input_ids, self.config.placeholder_token_id), extend(attention_mask, 1), relaid

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              query_sets: Sequence[str] | None = None, **backbone_inputs):
        """Run the prompt + queries through the backbone.

        Args:
            input_ids: (B, L) token ids, left or right padded.
            attention_mask: (B, L) 1 for real tokens.
            query_sets: set names; default the active set.
            **backbone_inputs: pixel_values, image_grid_thw, mm_token_type_ids, ... as the processor returned them.

        Returns:
            (pooled (B, embedding_dim) float32, query_states (B, N_q, H)) of the active set; with ``query_sets``, a
            dict set name -> that pair, in the order given.
        """
        names = self.latent_queries.checked(query_sets if query_sets is not None else self.active_query_set)
        inputs = {k: v for k, v in backbone_inputs.items() if v is not None}
        grad, frozen = torch.is_grad_enabled(), not any(p.requires_grad for p in self.backbone.parameters())
        # The prefix cache (prompt once, queries after it) is exact whenever the backbone gets no gradient.
        cached = self.config.training_path == "prefix_cache" and (frozen or not grad)
        shared = cached and len(names) > 1 and block_mask_allowed(self.spec, self.backbone)
        prefix = cached and (shared or grad)  # a grad step: backward runs through the query tokens only
        states: dict[str, torch.Tensor] = {}
        for group in [names] if shared else [[n] for n in names]:
            blocks = [self.get_query_set(n) for n in group]
            sizes = [b.shape[0] for b in blocks]
            ids, mask, relaid = self._relay_left(input_ids, attention_mask, inputs, 0 if prefix else sizes[0])
            extra = {**inputs, **relaid}
            if prefix:
                out = prefix_cache_query_states(self.backbone.base_model, self.spec, ids, mask, torch.cat(blocks),
                                                extra, sizes=sizes)  # (B, sum(sizes), H)
            else:  # one full forward; at inference it needs no cache
                positions = sequence_position_ids(self.backbone.base_model, self.spec, ids, mask, extra)
                with self._inject(tuple(ids.shape), blocks[0]):
                    out = self.backbone.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                   use_cache=False, return_dict=True, **extra)
                out = out.last_hidden_state[:, -sizes[0]:]  # (B, N_q, H)
            states.update(zip(group, out.split(sizes, dim=1)))
        result = {name: (self.pool(states[name]), states[name]) for name in names}
        return result if query_sets is not None else result[names[0]]

    def pool(self, query_states: torch.Tensor) -> torch.Tensor:
        """(B, N_q, H) -> (B, embedding_dim) float32: mean (or last) query, optional head, optional L2 norm."""
        states = query_states.float()
        pooled = states.mean(dim=1) if self.config.pooling == "mean" else states[:, -1]
        if self.projection is not None:  # in its own dtype, should the head itself have been cast
            pooled = self.projection(pooled.to(self.projection.weight.dtype)).float()
        return nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        task: str | None = None,
        return_loss: bool = True,
        query_sets: Sequence[str] | None = None,
        **other_backbone_inputs,
    ) -> SLQModelOutput:
        """Embed a processed batch; with a pair batch, also compute the contrastive loss.

        Pair batches (what ``slq_hf.training.SLQDataCollator`` builds): the plain keys hold the query side of each
        pair, the same keys prefixed ``positive_`` hold the positive side, row-aligned, and keys prefixed
        ``negative_`` optionally hold M hard negatives.

        Args:
            input_ids: (B, L) prompt ids from the backbone's processor (left or right padding).
            attention_mask: (B, L).
            pixel_values / image_grid_thw / mm_token_type_ids / **other_backbone_inputs: as returned by the processor,
                plus the ``positive_*`` / ``negative_*`` sides of a pair batch.
            task: sentence-transformers' ``encode_query`` / ``encode_document`` pass ``"query"`` / ``"document"``:
                the query set of that name is used when the model has one, else the active set.
            return_loss: compute the symmetric InfoNCE when a positive side is given; negatives are gathered
                across ranks under torch.distributed.
            query_sets: several sets on ONE prompt pass per side; per-set results in the ``*_outputs`` fields, one
                loss per set (``loss`` is their mean). Pair batches use ``model.joint_query_sets`` otherwise.
        """
        # sentence-transformers and the Trainer pass return_dict=True; the output is always a ModelOutput.
        other_backbone_inputs.pop("return_dict", None)
        sides = _split_pair_sides(other_backbone_inputs)
        if query_sets is None and self.joint_query_sets and "positive" in sides:
            query_sets = self.joint_query_sets
        names = self.latent_queries.checked(query_sets if query_sets is not None else
                                            self.query_set_for_task(task) or self.active_query_set)
        main = self.active_query_set if self.active_query_set in names else names[0]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, **other_backbone_inputs)
        query = self.embed(**inputs, query_sets=names)
        pooled = {name: query[name][0] for name in names}
        # ModelOutput keeps only fields given at construction (later attributes miss to_tuple), so collect first.
        out: dict[str, Any] = {"pooler_output": pooled[main], "query_states": query[main][1]}
        per_set: dict[str, Any] = {"pooler_outputs": pooled}  # returned only when the call named query sets
        if "positive" in sides:
            positive, negative = ({n: pair[0] for n, pair in self.embed(**sides[side], query_sets=names).items()}
                                  if side in sides else {} for side in PAIR_SIDES)  # set name -> (B, D)
            if positive[main].shape != pooled[main].shape:
                raise ValueError(f"The positive side has {positive[main].shape[0]} rows but the query side has "
                                 f"{pooled[main].shape[0]}; a pair batch needs one positive per query (row i pairs "
                                 "with row i).")
            out["positive_pooler_output"], per_set["positive_pooler_outputs"] = positive[main], positive
            if return_loss:  # one loss per set: each set is its own embedder, sharing only the temperature
                results = {n: symmetric_infonce(pooled[n], positive[n], self.logit_scale, negative.get(n),
                                                max_logit_scale=MAX_LOGIT_SCALE) for n in names}
                out["loss"] = torch.stack([r.loss for r in results.values()]).mean()
                out["accuracy"] = results[main].accuracy
                per_set["losses"] = {n: r.loss for n, r in results.items()}
                per_set["accuracies"] = {n: r.accuracy for n, r in results.items()}
        return SLQModelOutput(**out, **(per_set if query_sets is not None else {}))

    # ------------------------------------------------------------------------------------------------- encode
    @torch.inference_mode()
    def encode(
        self,
        inputs: SLQInput | list[SLQInput],
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
        instruction: str | None = None,
        query_sets: Sequence[str] | None = None,
        max_batch_tokens: int | None = None,
        **budgets: int | None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Embed texts, images (PIL or path) and ``{"image", "text"}`` dicts with the active query set, or with
        several sets at once (``query_sets=[...]``: one prompt pass per batch for all of them).

        Prompts follow the paper: the backbone's chat template with one user turn (instruction, image, text) and the
        generation prompt; the queries follow it. Inputs are sorted by estimated prompt tokens into batches of at
        most ``batch_size`` items and, with ``max_batch_tokens``, at most that many padded tokens (collated one at a
        time); results come back in input order. ``max_image_tokens=`` / ``min_image_tokens=`` /
        ``max_text_tokens=`` override the model's budgets for this call (``budgets.py``).

        Returns:
            float32 (N, embedding_dim) on CPU; (0, embedding_dim) for an empty list. With ``query_sets``: a dict set
            name -> such a tensor.
        """
        if self.processor is None:
            raise ValueError("This SLQModel has no processor, which encode() needs to turn inputs into prompts. Pass "
                             "processor=AutoProcessor.from_pretrained(<backbone>) to SLQModel.from_backbone / "
                             "from_pretrained, or set model.processor.")
        processor = with_overrides(self.processor, self.config, **budgets)
        names = self.latent_queries.checked(query_sets if query_sets is not None else self.active_query_set)
        # Huge images are shrunk to the processor's budget while loading (JPEGs decode at reduced scale).
        items = to_items(inputs, budget=image_budget(processor))
        out = {name: torch.empty(len(items), self.config.embedding_dim, dtype=torch.float32) for name in names}
        max_batch_tokens = self.max_batch_tokens if max_batch_tokens is None else max_batch_tokens
        with _PROCESSOR_LOCK:  # it tokenizes to plan the batches
            batches = encode_batches(processor, items, batch_size, max_batch_tokens, instruction)
        from tqdm.auto import tqdm

        show = len(batches) > 8 if show_progress_bar is None else show_progress_bar
        max_length = self.max_prompt_length()
        for index in tqdm(batches, desc="SLQ encode", unit="batch", disable=not show):
            with _PROCESSOR_LOCK:
                batch = collate(processor, [items[i] for i in index], instruction, max_length=max_length)
            result = self(**batch.to(self.device), query_sets=names).pooler_outputs
            for name in names:
                out[name][index] = result[name].float().cpu()
        return out if query_sets is not None else out[names[0]]

    def rerank(self, query: SLQInput, candidates: Sequence[SLQInput], scorer: str = "likelihood", *,
               top_k: int | None = None, batch_size: int = 8, **kwargs):
        """Score (query, candidate) pairs with the frozen backbone itself and sort the candidates (second stage after
        retrieval with :meth:`encode`): ``"likelihood"`` or ``"yes_no"``, see ``reranking.py``.

        Returns:
            ``RerankResult`` with ``scores`` (N,) in candidate order and ``order`` (top_k or N,) best first.
        """
        from .reranking import rerank

        return rerank(self.backbone, self.processor, query, candidates, scorer, top_k=top_k, batch_size=batch_size,
                      **kwargs)

    def max_prompt_length(self) -> int | None:
        """Longest prompt (tokens) that leaves room for the queries within the backbone's positions; ``collate``
        truncates longer user texts to it (with a warning), keeping the chat template's generation prompt."""
        return prompt_length_limit(self.backbone.config, self.processor, reserved=self.max_query_set_size())

    def train(self, mode: bool = True) -> SLQModel:
        """Switch SLQ's own modules to train mode; a frozen backbone stays in eval mode.

        The Trainer calls ``model.train()`` every step. A frozen backbone with dropout would then compute a different
        (random) function than at inference, and two runs of the same step would disagree.
        """
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    def _apply(self, fn, recurse: bool = True) -> SLQModel:
        """``model.to(torch.bfloat16)`` / ``model.half()`` cast the backbone only: the queries, ``logit_scale`` and
        head keep their float32 values (in bf16, an AdamW step of 5e-4 is below logit_scale's resolution)."""
        own = {n: (p.data, None if p.grad is None else p.grad.data)  # .data: torch swaps the grad's data in place
               for n, p in self.named_parameters() if not n.startswith("backbone.")}
        super()._apply(fn, recurse)
        for name, param in self.named_parameters():
            if name in own and param.dtype != own[name][0].dtype:  # moved to the new device, not cast
                data, grad = own[name]
                param.data = data.to(param.device)
                param.grad = None if grad is None else grad.to(param.device)
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Picklable even after a forward (sentence-transformers' multi-process pool pickles the model): the
        output-capturing hooks transformers installs are closures, left out of the copy (see pickling.py)."""
        state = super().__getstate__()
        state["_modules"] = OrderedDict((name, without_capture_hooks(m)) for name, m in self._modules.items())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        register_output_recorders(self)  # see pickling.py: the new process never ran the backbone's __init__


SLQConfig.register_for_auto_class()
SLQModel.register_for_auto_class("AutoModel")


# ------------------------------------------------------------------------------------------------------- helpers
def _read_queries(file: str | os.PathLike, hidden_size: int | None, whole_checkpoint: bool = False,
                  num_queries: int | None = None, limit: int | None = None, name: str = "") -> torch.Tensor:
    """(N_q, H) ``queries`` of a query-set file (or of an SLQ model.safetensors), validated before allocation: N_q
    against ``num_queries`` when the folder's index gives it, and against ``limit`` (the most queries that fit the
    backbone's positions) from the header, so an oversized set ``name`` is refused without reading it."""
    shape = read_header(file)[0].get(QUERY_SET_TENSOR, ("", ()))[1]
    if limit is not None and len(shape) == 2 and shape[0] > limit:
        raise CheckpointError(f"{file}: query set {name!r} would have {shape[0]} queries, but at most {limit} fit "
                              "after a prompt within the backbone's positions; it was made for another backbone.")
    others = sorted(SLQ_TENSOR_NAMES - {QUERY_SET_TENSOR}) if whole_checkpoint else []
    expected = {QUERY_SET_TENSOR: (num_queries, hidden_size), **dict.fromkeys(others)}
    return read_tensors(file, expected, optional=others)[QUERY_SET_TENSOR]


def _read_query_sets(path, location: dict[str, Any], hidden_size: int | None, limit: int | None) -> dict[str, Any]:
    """{"active": name, "sets": {name: (N_q, H) queries}} from ``query_sets/`` of an SLQ folder, at most ``limit``
    queries each; a folder without the index (one saved with the default set only) gives no extra sets."""
    index_file = _optional_file(path, QUERY_SETS_INDEX, location)
    if index_file is None:
        return {"active": DEFAULT_QUERY_SET, "sets": {}}
    index, sets = read_query_set_index(index_file), {}
    for name, entry in index["sets"].items():
        file = _optional_file(path, entry["file"], location)
        if file is None:
            raise CheckpointError(f"{path}: {QUERY_SETS_INDEX} lists query set {name!r} but {entry['file']} is "
                                  "missing; re-save the model or restore the file.")
        sets[name] = _read_queries(file, hidden_size, num_queries=entry["num_queries"], limit=limit, name=name)
    return {"active": index["active"], "sets": sets}


def _config_of_this_save(config: SLQConfig | None, path, location: dict[str, Any]
                         ) -> tuple[SLQConfig, SLQConfig, dict[str, Any]]:
    """The config to build the model from, the config that save wrote (what fixed fields and tensor shapes are
    checked against) and the load-time changes to apply to the first (call inside the read window).

    ``AutoModel.from_pretrained`` (and sentence-transformers through it) reads config.json, applying keywords such
    as ``pooling=``, before this class's ``from_pretrained`` runs, i.e. outside ``read_folder``: a re-save in between
    would pair that config with the next save's weights. So a ``config=`` read from a config.json is compared with
    the folder's config.json here; when they differ, the folder's is used with the passed config's changes (load
    keywords, edits of its fields) on top; either way those changes are checked like from_pretrained's own keywords
    (AutoConfig applied them unchecked against the saved queries). A config built in code is used as given.
    """
    contents: list[Any] = []

    def read_config_dict() -> Any:
        if _optional_file(path, CONFIG_NAME, location) is None:
            raise OSError(f"{path}: no {CONFIG_NAME} found; an SLQ folder written by save_pretrained has one. Is "
                          "this the right folder?")
        contents.append(SLQConfig.get_config_dict(str(path), **location)[0])
        return contents[-1]

    record = None if config is None else changes_since_read(config, read_config_dict)
    if config is not None and record is None:
        return config, config, {}
    try:
        saved = SLQConfig.from_dict(copy.deepcopy(contents[-1] if contents else read_config_dict()))
    except (TypeError, ValueError) as err:  # not a JSON object, or a bad value: name the file
        raise CheckpointError(f"{path}/{CONFIG_NAME}: {err}") from None
    if record is None:
        return saved, saved, {}
    unchanged, changes = record
    return (config if unchanged else saved), saved, changes


def _with_overrides(config: SLQConfig, overrides: dict[str, Any], path, saved: SLQConfig | None = None
                    ) -> SLQConfig:
    """``config`` with from_pretrained keywords that name SLQConfig fields applied (and validated); fields fixed by
    training must keep their value in ``saved`` (default ``config``)."""
    if not overrides:
        return config
    saved = config if saved is None else saved
    for key in _FIXED_FIELDS:
        # projection_dim: from_backbone's name for projection_size (the config's projection_dim is the output width)
        value = saved.projection_size if key == "projection_dim" else getattr(saved, key)
        if key in overrides and overrides[key] != value:
            raise ValueError(f"{path}: {key}={overrides[key]!r} cannot be changed when loading: the saved queries "
                             f"were trained with {key}={value!r}. Train a new model (from_backbone) "
                             f"for another value.{_FIXED_HINTS.get(key, '')}")
    changed = {k: v for k, v in overrides.items() if k not in _FIXED_FIELDS}
    SLQConfig(**{**config.field_values(), **changed})  # validates the values
    for key, value in changed.items():
        setattr(config, key, value)
    return config


def _split_pair_sides(inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pop the ``positive_*`` / ``negative_*`` keys of a pair batch out of ``inputs`` (in place).

    Returns {"positive": {"input_ids": ..., ...}, "negative": {...}} with the prefixes stripped; sides not present
    are absent.
    """
    sides: dict[str, dict[str, Any]] = {}
    for key in [k for k in inputs if k.startswith(tuple(f"{side}_" for side in PAIR_SIDES))]:
        side, name = key.split("_", 1)
        sides.setdefault(side, {})[name] = inputs.pop(key)
    for side, values in sides.items():
        if "input_ids" not in values:
            raise ValueError(f"The batch has {sorted(f'{side}_{k}' for k in values)} but no {side}_input_ids; build "
                             "pair batches with slq_hf.training.SLQDataCollator.")
    if "negative" in sides and "positive" not in sides:
        raise ValueError("The batch has negative_* inputs but no positive_* side; hard negatives need pairs.")
    return sides


def _keep_4bit_layers_differentiable(backbone: nn.Module) -> None:
    """Stop bitsandbytes' CPU 4-bit layers from switching to their inference-only kernel.

    On CPUs with AVX512-BF16, a ``Linear4bit`` that runs in eval mode on an input without grad (the frozen backbone
    at inference, or the prompt pass of the prefix cache) repacks its weight for a kernel that has no backward. Every
    later call uses that kernel, and the gradient to the queries then silently skips those layers. Duck-typed on
    bitsandbytes' attributes so this file imports nothing from it.
    """
    for module in backbone.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            unpack = getattr(sys.modules.get(type(module).__module__), "_convert_weight_packed_for_cpu_inverse", None)
            if unpack is None:
                raise RuntimeError(f"{type(module).__name__} weights were repacked for bitsandbytes' CPU inference "
                                   "kernel, which has no backward pass, and this bitsandbytes version offers no way "
                                   "back. Reload the model before computing gradients.")
            weight.data, weight.quant_state = unpack(weight.data, state)


def _missing_local_path(name: str) -> bool:
    """A path that is clearly local (absolute, ``./``-relative, a ``.safetensors`` file) and does not exist: it is not
    a Hub id, so it fails at once instead of after the Hub's retries."""
    return (os.path.isabs(name) or name.startswith(".") or name.endswith(".safetensors")) and not Path(name).exists()


def _pin(name: str) -> str:
    """A local folder as its absolute path (so the pin works from any directory), anything else as given."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def _load_backbone(name: str | None, revision: str | None = None, folder: Any = None, **kwargs) -> PreTrainedModel:
    where = f" (pinned in {folder}/config.json)" if folder is not None else ""
    hint = "pass backbone_name_or_path=<local folder or Hub id> to load it from elsewhere"
    if not name:
        raise ValueError(f"No backbone is pinned{where}; {hint}.")
    if _missing_local_path(name):
        raise OSError(f"The backbone {name!r}{where} does not exist on this machine; {hint}.")
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, revision=revision, **kwargs)
    except OSError as err:
        raise OSError(f"Could not load the backbone {name!r}{where}: {err}\nTo use another copy, {hint}.") from err
    except ValueError as err:
        if "SLQConfig" not in str(err):  # transformers' "Unrecognized configuration class ...SLQConfig..."
            raise
        raise ValueError(f"{name!r} is an SLQ model, not a backbone: load it with SLQModel.from_pretrained({name!r}), "
                         "or pass the backbone it names in its config.json (backbone_name_or_path).") from None
    except TypeError as err:
        if not kwargs or "unexpected keyword argument" not in str(err):
            raise
        raise TypeError(f"{err}. Keyword arguments that are neither SLQConfig fields ({', '.join(SLQ_FIELDS)}) nor "
                        f"Hub arguments go to the backbone's from_pretrained ({name!r}), which refused it.") from err
    backbone_spec(model.config.model_type)
    return model.eval()


def try_processor(name: Any, revision: str | None = None, quiet: bool = False, **kwargs) -> Any:
    """The processor saved at ``name``, or None when it has none (a backbone saved with model.save_pretrained only).

    The processor is a stock transformers class (never remote code). Its tokenizer loader peeks at an SLQ folder's
    config.json and warns that "slq" is not its model type; that warning is noise here, so it is silenced.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoProcessor.from_pretrained(str(name), revision=revision, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not quiet:
            logger.warning(f"No processor found at {name!r} ({str(err).splitlines()[0][:200]}). forward(), training "
                           "on processed batches and saving work; encode() needs processor=.")
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def _optional_file(path, filename: str, location: dict[str, Any]) -> str | None:
    """Local path of ``filename`` in the folder or Hub repo ``path`` (downloaded when needed), None when absent."""
    return cached_file(str(path), filename, _raise_exceptions_for_missing_entries=False, **location)


def _resolve_weights(path, location: dict) -> str:
    weights = _optional_file(path, WEIGHTS_NAME, location)
    if weights is None:
        pickles = [n for n in ("pytorch_model.bin", "model.pt", "queries.pt") if _optional_file(path, n, location)]
        hint = (f" It holds {pickles}: pickle files can run arbitrary code when loaded and are never read. Convert "
                "them with `slq-hf convert-reference` in a trusted environment.") if pickles else ""
        raise OSError(f"{path}: no {WEIGHTS_NAME} found.{hint}")
    return weights
