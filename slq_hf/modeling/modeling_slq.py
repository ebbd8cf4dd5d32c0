"""SLQModel: a frozen vision-language backbone + a few trainable latent queries = an embedding model.

Ships inside every saved checkpoint (remote code): imports only torch, transformers, safetensors, PIL, tqdm and
sibling modules.

Encode data flow (DESIGN.md): processed prompt (B, L) -> re-laid to left padding -> N_q placeholder ids appended ->
the backbone's own base-model forward, where a hook on the input-embedding layer swaps the placeholder rows for the
queries -> last_hidden_state[:, -N_q:] -> pool -> (optional head) -> L2 normalise.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.utils import ModelOutput, cached_file
from transformers.utils import logging as hf_logging

from .backbones import backbone_spec, input_embedding_stats, pick_placeholder_token_id
from .configuration_slq import SLQConfig
from .losses import symmetric_infonce
from .pickling import register_output_recorders, without_capture_hooks
from .prefix_cache import prefix_cache_query_states
from .processing_slq import SLQInput, collate, image_budget, prompt_length_limit, to_items
from .query_sets import QuerySetsMixin, SLQQuerySetsOutput
from .safetensors_io import atomic_save_file
from .sentence_transformers_files import write_sentence_transformers_files

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_METADATA = {"format": "pt", "library": "slq_hf"}
# CLIP clamps its learnable logit scale at 100 (temperature >= 0.01) to keep training stable.
MAX_LOGIT_SCALE = math.log(100.0)
# Hub arguments that locate the SLQ folder itself; the backbone gets its own revision from the config.
_AUTO_CLASS_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                      "_commit_hash")
_SHARED_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")


@dataclass
class SLQModelOutput(ModelOutput):
    """Output of ``SLQModel.forward``.

    Attributes:
        loss: symmetric InfoNCE over the batch when a pair was given and ``return_loss`` is set; shape ().
        pooler_output: (B, embedding_dim) pooled (and, by default, L2-normalised) float32 embeddings.
        query_states: (B, num_queries, hidden_size) final hidden states at the query positions.
        accuracy: in-batch retrieval accuracy of the contrastive step, when a loss was computed.
        positive_pooler_output: (B, embedding_dim) embeddings of the second side of a pair, when given.
    """

    loss: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    query_states: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    positive_pooler_output: torch.FloatTensor | None = None


@dataclass
class _Injection:
    shape: tuple[int, int]
    queries: torch.Tensor  # (N_q, H)


class SLQModel(QuerySetsMixin, PreTrainedModel):
    """Frozen vision-language backbone with ``num_queries`` trainable latent queries appended to every prompt.

    Build one with :meth:`from_backbone` (fresh queries) or :meth:`from_pretrained` (a saved SLQ folder). Only
    ``queries``, ``logit_scale`` and the optional ``projection`` head are trainable and saved.
    """

    config_class = SLQConfig
    base_model_prefix = "slq"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # The Trainer must hand our own loss through (it is computed inside forward).
    accepts_loss_kwargs = False
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: SLQConfig, backbone: PreTrainedModel | None = None, processor: Any = None):
        if backbone is None:
            backbone = _load_backbone(config.backbone_name_or_path, config.backbone_revision)
        spec = backbone_spec(backbone.config.model_type)
        embedding = backbone.get_input_embeddings()
        hidden = embedding.weight.shape[1]
        if config.hidden_size is not None and config.hidden_size != hidden:
            raise ValueError(
                f"SLQConfig.hidden_size={config.hidden_size} but the backbone "
                f"{config.backbone_name_or_path!r} embeds tokens in {hidden} dimensions; queries trained on one "
                "backbone cannot run on another."
            )
        config.hidden_size = hidden
        config.backbone_model_type = backbone.config.model_type
        if config.placeholder_token_id is None:
            config.placeholder_token_id = pick_placeholder_token_id(backbone.config)
        super().__init__(config)

        device = embedding.weight.device
        self.queries = nn.Parameter(torch.zeros(config.num_queries, hidden, device=device))  # (N_q, H) fp32
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature), device=device))
        self.projection = nn.Linear(hidden, config.projection_dim, device=device) if config.projection_dim else None
        # post_init before the backbone is attached, so transformers' weight init never touches backbone weights.
        self.post_init()
        self._init_queries(embedding)

        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.spec = spec
        self.processor = processor
        self._injection: _Injection | None = None
        self._hook = embedding.register_forward_hook(self._embedding_hook, with_kwargs=True)

    # ----------------------------------------------------------------------------------------------- construction
    def _init_weights(self, module: nn.Module) -> None:
        # Queries are initialised from the backbone's embedding statistics in _init_queries; nothing else is ours.
        if isinstance(module, nn.Linear) and module is getattr(self, "projection", None):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def _init_queries(self, embedding: nn.Module) -> None:
        rows = input_embedding_stats(embedding, num_samples=max(2048, self.config.num_queries))  # (S, H)
        generator = torch.Generator().manual_seed(0)
        if self.config.query_init == "vocab":
            init = rows[torch.randperm(rows.shape[0], generator=generator)[: self.config.num_queries]]
        else:
            std = rows.std().item()
            init = torch.randn(self.queries.shape, generator=generator) * std
        self.queries.copy_(init.to(self.queries.device))

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
        **backbone_kwargs,
    ) -> SLQModel:
        """Attach fresh latent queries to a frozen backbone.

        Args:
            backbone: Hub id, local path, or an already loaded ``*ForConditionalGeneration`` model.
            num_queries: number of latent queries N_q.
            processor: the backbone's processor; loaded from ``backbone`` when it is an id or a path.
            revision: Hub revision of the backbone, pinned in the config.
            **backbone_kwargs: go to the backbone's ``from_pretrained`` (``dtype``, ``device_map``,
                ``quantization_config``, ``attn_implementation``, ...).
        """
        loaded = isinstance(backbone, PreTrainedModel)
        name = (backbone.config._name_or_path or backbone.name_or_path) if loaded else str(backbone)
        # The config is validated first, so a bad option fails before a multi-GB backbone is loaded.
        config = SLQConfig(
            backbone_name_or_path=name or None,
            backbone_revision=revision,
            num_queries=num_queries,
            pooling=pooling,
            normalize=normalize,
            query_init=query_init,
            temperature=temperature,
            projection_dim=projection_dim,
            training_path=training_path,
        )
        if loaded:
            if backbone_kwargs:
                raise ValueError(f"Backbone arguments {sorted(backbone_kwargs)} were given with an already loaded "
                                 "backbone; load the backbone with them yourself, or pass its id/path instead.")
            model = backbone
            if processor is None and name:
                try:  # the loaded model remembers where it came from; its processor usually lives there too
                    processor = AutoProcessor.from_pretrained(name, revision=revision)
                except (OSError, ValueError):
                    processor = None  # encode() then asks for processor=; forward() works without one
        else:
            model = _load_backbone(name, revision, **backbone_kwargs)
            if processor is None:
                processor = AutoProcessor.from_pretrained(name, revision=revision)
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
        """Load a saved SLQ folder (or Hub repo): the pinned backbone plus the saved queries.

        Args:
            pretrained_model_name_or_path: folder or Hub id written by :meth:`save_pretrained`.
            backbone_name_or_path: load the backbone from here instead of the id pinned in config.json.
            backbone: an already loaded backbone to reuse (no second copy of the weights).
            **kwargs: hub arguments for the SLQ folder (``revision``, ``subfolder``, ``token``...) and backbone
                loading arguments (``dtype``, ``device_map``, ``quantization_config``, ``attn_implementation``...).
        """
        for key in _AUTO_CLASS_KWARGS:
            kwargs.pop(key, None)
        shared = {k: kwargs.pop(k) for k in _SHARED_HUB_KWARGS if k in kwargs}
        location = {"revision": kwargs.pop("revision", None), "subfolder": kwargs.pop("subfolder", ""), **shared}
        if config is None:
            config = SLQConfig.from_pretrained(pretrained_model_name_or_path, **location)
        weights = _resolve_weights(pretrained_model_name_or_path, location)

        if backbone is None:
            source = str(backbone_name_or_path or config.backbone_name_or_path or "")
            if not source:
                raise ValueError(f"{pretrained_model_name_or_path}: config.json pins no backbone; pass "
                                 "backbone_name_or_path=...")
            revision = None if backbone_name_or_path else config.backbone_revision
            backbone = _load_backbone(source, revision, **shared, **kwargs)
            if backbone_name_or_path:
                config.backbone_name_or_path = str(backbone_name_or_path)
        elif kwargs:
            raise ValueError(f"Backbone arguments {sorted(kwargs)} were given with an already loaded backbone.")
        if processor is None:
            processor = _load_processor(pretrained_model_name_or_path, config, location, shared)
        model = cls(config, backbone=backbone, processor=processor)
        model.load_trainable_state(weights)
        model._load_saved_query_sets(pretrained_model_name_or_path, location)  # query_sets/*.safetensors, if any
        model.eval()
        return model

    # ------------------------------------------------------------------------------------------------ save / load
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that make an SLQ checkpoint: queries, logit_scale and the optional projection head."""
        state = {"queries": self.queries, "logit_scale": self.logit_scale}
        if self.projection is not None:
            state["projection.weight"] = self.projection.weight
            state["projection.bias"] = self.projection.bias
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state(self, path_or_state: str | os.PathLike | dict[str, torch.Tensor]) -> None:
        """Load queries (+ temperature, head) from a safetensors file or a state dict, checking every tensor."""
        if isinstance(path_or_state, dict):
            state, source = path_or_state, "state dict"
        else:
            state, source = _read_safetensors(path_or_state), str(path_or_state)
        expected = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}
        queries = state.get("queries")
        if queries is not None and queries.ndim == 2 and queries.shape[1] != self.config.hidden_size:
            raise ValueError(
                f"{source}: the saved queries are {queries.shape[1]} wide but the backbone "
                f"{self.config.backbone_name_or_path!r} has hidden size {self.config.hidden_size}. They were "
                "trained for a different backbone; load them with the backbone they were trained on."
            )
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: expected tensors {sorted(expected)}; missing {missing}, unexpected "
                             f"{unexpected}. Is this an SLQ checkpoint with the same config?")
        for name, shape in expected.items():
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} "
                                 "from config.json (num_queries, hidden_size, projection_dim).")
            if not tensor.is_floating_point():
                raise ValueError(f"{source}: tensor {name!r} has dtype {tensor.dtype}; expected a float tensor.")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{source}: tensor {name!r} contains NaN or Inf values; the checkpoint is corrupt "
                                 "(or training diverged). Use an earlier checkpoint.")
        with torch.no_grad():
            for name, param in self._trainable_params().items():
                param.copy_(state[name].to(dtype=param.dtype, device=param.device))

    def _trainable_params(self) -> dict[str, nn.Parameter]:
        params = {"queries": self.queries, "logit_scale": self.logit_scale}
        if self.projection is not None:
            params.update({"projection.weight": self.projection.weight, "projection.bias": self.projection.bias})
        return params

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Write a queries-only SLQ folder: config.json (auto_map, pinned backbone), model.safetensors with only the
        trainable tensors, the ``slq_hf/modeling`` code files (for ``trust_remote_code``) and the processor files.

        Extra keyword arguments of ``PreTrainedModel.save_pretrained`` (``state_dict``, ``safe_serialization``,
        ``push_to_hub``...) are accepted and ignored, except ``is_main_process``: only trainable tensors are ever
        written, always as safetensors.
        """
        if not kwargs.get("is_main_process", True):
            return
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.auto_map = {"AutoConfig": "configuration_slq.SLQConfig", "AutoModel": "modeling_slq.SLQModel"}
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(out)
        atomic_save_file(self.trainable_state_dict(), out / WEIGHTS_NAME, metadata=WEIGHTS_METADATA)
        self._save_query_sets(out)  # extra query sets: query_sets/<name>.safetensors + sets.json
        for source in Path(__file__).parent.glob("*.py"):
            if source.name != "__init__.py":
                shutil.copyfile(source, out / source.name)
        if self.processor is not None:
            self.processor.save_pretrained(out)
        # Every SLQ folder is also a sentence-transformers model (SentenceTransformer(out, trust_remote_code=True)).
        # max_seq_length: sentence-transformers then truncates over-long texts exactly like encode (tail kept).
        write_sentence_transformers_files(out, max_seq_length=self.max_prompt_length())

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        **kwargs,
    ) -> str:
        """Upload the queries-only SLQ folder (what :meth:`save_pretrained` writes) to ``repo_id`` on the Hub.

        The folder is saved to a temporary directory, checked (nothing that looks like backbone weights may go up)
        and committed with huggingface_hub. A short model card is added only when the repository has no README.md
        yet; ``slq-hf export`` + ``slq-hf push`` publish the full card with evaluation results. Serialization options
        of ``PreTrainedModel.push_to_hub`` (``max_shard_size``, ...) are accepted and ignored: there is one small file.

        Returns:
            huggingface_hub's ``CommitInfo`` (a ``str`` holding the commit URL).
        """
        import tempfile

        # Imported here so loading a checkpoint never needs the upload code path.
        from .upload import default_model_card, remote_has_readme, upload_slq_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            if not remote_has_readme(repo_id, token=token, revision=revision):
                Path(tmp, "README.md").write_text(default_model_card(self.config, repo_id, tags), encoding="utf8")
            return upload_slq_folder(tmp, repo_id, private=private, token=token, revision=revision,
                                     create_pr=create_pr, commit_message=commit_message,
                                     commit_description=commit_description)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Accept full or queries-only state dicts (Trainer resume): backbone keys are never required."""
        own = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        self.load_trainable_state(self._load_query_set_state(own))  # extra query sets first, then the rest
        return nn.modules.module._IncompatibleKeys([], [])

    def __getstate__(self) -> dict[str, Any]:
        """Picklable even after a forward: transformers' output-capturing hooks (closures) are left out of the copy
        (see pickling.py); sentence-transformers' multi-process pool pickles the model for its workers."""
        state = super().__getstate__()
        state["_modules"] = OrderedDict((name, without_capture_hooks(m)) for name, m in self._modules.items())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        register_output_recorders(self)  # see pickling.py: the new process never ran the backbone's __init__

    # ------------------------------------------------------------------------------------------------------ forward
    def _embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        injection = self._injection
        if injection is None:
            return None  # inert outside SLQ's own forward (e.g. during backbone.generate)
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        # Some backbones embed other ids internally (Qwen3-VL embeds a scalar id): only touch the prompt itself.
        if ids is None or tuple(ids.shape) != injection.shape:
            return None
        num_queries = injection.queries.shape[0]
        queries = injection.queries.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)  # (B, N_q, H)
        return torch.cat([output[:, :-num_queries], queries], dim=1)  # (B, L + N_q, H)

    @contextmanager
    def _inject(self, shape: tuple[int, int], queries: torch.Tensor):
        previous, self._injection = self._injection, _Injection(tuple(shape), queries)
        try:
            yield
        finally:
            self._injection = previous

    def _relay_left(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict[str, Any],
                    num_queries: int | None = None):
        """Move every row's padding to the left (stable sort on the mask) and append ``num_queries`` query slots
        (default ``config.num_queries``; 0 for the prompt alone).

        Returns ids (B, L + N_q), mask (B, L + N_q) and the per-token extras re-laid and zero-extended.
        """
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}.")
        order = torch.sort(attention_mask.long(), dim=1, stable=True).indices  # (B, L): pads first, order kept
        num_queries = self.config.num_queries if num_queries is None else num_queries
        pad = dict(device=input_ids.device, dtype=input_ids.dtype)
        ids = torch.cat([input_ids.gather(1, order), torch.full((batch, num_queries), self.config.placeholder_token_id,
                                                                **pad)], dim=1)
        mask = torch.cat([attention_mask.gather(1, order), torch.ones((batch, num_queries), device=ids.device,
                                                                      dtype=attention_mask.dtype)], dim=1)
        relaid = {}
        for key in self.spec.token_keys:
            value = extra.get(key)
            if isinstance(value, torch.Tensor) and value.shape == (batch, length):
                zeros = torch.zeros((batch, num_queries), device=value.device, dtype=value.dtype)
                relaid[key] = torch.cat([value.gather(1, order), zeros], dim=1)
        return ids, mask, relaid

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **backbone_inputs):
        """Run the prompt + queries through the backbone.

        Args:
            input_ids: (B, L) token ids, left or right padded.
            attention_mask: (B, L) 1 for real tokens.
            **backbone_inputs: pixel_values, image_grid_thw, mm_token_type_ids, ... as the processor returned them.

        Returns:
            (pooled (B, embedding_dim) float32, query_states (B, N_q, H) in the backbone's dtype)
        """
        backbone_inputs = {k: v for k, v in backbone_inputs.items() if v is not None}
        queries = self.active_queries  # (N_q, H): the default set unless another one is active
        ids, mask, relaid = self._relay_left(input_ids, attention_mask, backbone_inputs, queries.shape[0])
        backbone_inputs.update(relaid)
        if self._use_prefix_cache():
            # Same result as the full forward, but backward only runs through the N_q query tokens (DESIGN.md).
            n = queries.shape[0]
            prompt_inputs = {k: v[:, :-n] if k in relaid else v for k, v in backbone_inputs.items()}
            query_states = prefix_cache_query_states(self.backbone.base_model, self.spec, ids[:, :-n], mask[:, :-n],
                                                     queries, prompt_inputs)  # (B, N_q, H)
            return self.pool(query_states), query_states
        with self._inject(tuple(ids.shape), queries):
            out = self.backbone.base_model(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=True,
                                           **backbone_inputs)
        query_states = out.last_hidden_state[:, -queries.shape[0]:]  # (B, N_q, H)
        return self.pool(query_states), query_states

    def _use_prefix_cache(self) -> bool:
        """Prefix cache only when it can pay off and is exact: a grad step on a frozen backbone. Inference keeps the
        single full forward (no cache to build), and a trainable backbone needs gradients through the prompt."""
        return (torch.is_grad_enabled() and self.config.training_path == "prefix_cache"
                and not any(p.requires_grad for p in self.backbone.parameters()))

    def pool(self, query_states: torch.Tensor) -> torch.Tensor:
        """(B, N_q, H) -> (B, embedding_dim) float32: mean (or last) query, optional head, optional L2 norm."""
        states = query_states.float()
        pooled = states.mean(dim=1) if self.config.pooling == "mean" else states[:, -1]
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.config.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        task: str | None = None,
        return_loss: bool = True,
        query_sets: list[str] | None = None,
        **other_backbone_inputs,
    ) -> SLQModelOutput | SLQQuerySetsOutput:
        """Embed a processed batch; with a pair batch, also compute the contrastive loss.

        Pair batches (what ``slq_hf.training.SLQDataCollator`` builds): the plain keys hold the query side of each
        pair, the same keys prefixed ``positive_`` (``positive_input_ids``, ``positive_pixel_values``, ...) hold the
        positive side, row-aligned, and keys prefixed ``negative_`` optionally hold M hard negatives.

        Args:
            input_ids: (B, L) prompt ids from the backbone's processor (left or right padding).
            attention_mask: (B, L).
            pixel_values / image_grid_thw / mm_token_type_ids / **other_backbone_inputs: as returned by the processor,
                plus the ``positive_*`` / ``negative_*`` sides of a pair batch.
            task: sentence-transformers' ``encode_query`` / ``encode_document`` pass ``"query"`` / ``"document"``:
                the query set of that name is used when the model has one, else the active set.
            return_loss: compute the symmetric InfoNCE (``slq_hf/modeling/losses.py``) when a positive side is
                given; negatives are gathered across ranks under torch.distributed.
            query_sets: names of several query sets to run on ONE prompt pass per side (``query_sets.py``); the
                result is then an ``SLQQuerySetsOutput`` keyed by set name, with one loss per set (``loss`` is their
                mean). Pair batches also use ``model.joint_query_sets`` when this is not given.

        Returns:
            SLQModelOutput with ``pooler_output`` (B, embedding_dim) and ``query_states`` (B, N_q, H); for pair
            batches also ``positive_pooler_output`` (B, embedding_dim), ``loss`` () and ``accuracy`` ().
        """
        # sentence-transformers and the Trainer pass return_dict=True; the output is always a ModelOutput, and
        # forwarding it would clash with the return_dict the backbone call sets itself.
        other_backbone_inputs.pop("return_dict", None)
        if torch.is_grad_enabled() and not getattr(self, "_grad_safe_4bit", False):
            _keep_4bit_layers_differentiable(self.backbone)
            self._grad_safe_4bit = True
        task_set = self.query_set_for_task(task)
        if task_set is not None and query_sets is None and task_set != self.active_query_set:
            with self.use_query_set(task_set):
                return self.forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                    return_loss=return_loss, **other_backbone_inputs)
        sides = _split_pair_sides(other_backbone_inputs)
        if query_sets is not None or (self.joint_query_sets and "positive" in sides):
            return self.forward_query_sets(query_sets or self.joint_query_sets, sides, return_loss,
                                           input_ids=input_ids, attention_mask=attention_mask,
                                           pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                           mm_token_type_ids=mm_token_type_ids, **other_backbone_inputs)
        pooled, query_states = self.embed(input_ids, attention_mask, pixel_values=pixel_values,
                                          image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                                          **other_backbone_inputs)
        if "positive" not in sides:
            return SLQModelOutput(pooler_output=pooled, query_states=query_states)
        positive = self.embed(**sides["positive"])[0]  # (B, D)
        if positive.shape != pooled.shape:
            raise ValueError(f"The positive side has {positive.shape[0]} rows but the query side has "
                             f"{pooled.shape[0]}; a pair batch needs one positive per query (row i pairs with row i).")
        negative = self.embed(**sides["negative"])[0] if "negative" in sides else None  # (M, D)
        loss = accuracy = None
        if return_loss:
            result = symmetric_infonce(pooled, positive, self.logit_scale, negative, max_logit_scale=MAX_LOGIT_SCALE)
            loss, accuracy = result.loss, result.accuracy
        return SLQModelOutput(loss=loss, pooler_output=pooled, query_states=query_states, accuracy=accuracy,
                              positive_pooler_output=positive)

    # ------------------------------------------------------------------------------------------------------- encode
    @torch.inference_mode()
    def encode(
        self,
        inputs: SLQInput | list[SLQInput],
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
        instruction: str | None = None,
        query_sets: list[str] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Embed texts, images (PIL or path) and ``{"image", "text"}`` dicts with the active query set, or with
        several sets at once (``query_sets=[...]``: one prompt pass per batch for all of them).

        Prompts follow the paper: the backbone's chat template with one user turn (instruction, image, text) and the
        generation prompt; the queries follow it. Inputs are length-sorted into batches; results come back in input
        order.

        Returns:
            float32 tensor (N, embedding_dim) on CPU; (0, embedding_dim) for an empty list. With ``query_sets``:
            a dict set name -> such a tensor.
        """
        if query_sets is not None:
            return self.encode_query_sets(inputs, query_sets, batch_size, show_progress_bar, instruction)
        count, batches = self._encode_batches(inputs, batch_size, show_progress_bar, instruction)
        out = torch.empty(count, self.config.embedding_dim, dtype=torch.float32)
        for index, batch in batches:
            out[index] = self(**batch).pooler_output.float().cpu()
        return out

    def _encode_batches(self, inputs: SLQInput | list[SLQInput], batch_size: int, show_progress_bar: bool | None,
                        instruction: str | None) -> tuple[int, Iterator[tuple[list[int], dict[str, Any]]]]:
        """The batching ``encode`` and ``encode_query_sets`` share: inputs -> length-sorted prompt batches.

        Checks the arguments and loads the inputs at once (so errors come before any work), then returns the number
        of items and an iterator of (row indices in input order, collated batch on the model's device). Batches are
        collated as they are consumed, so only one is held at a time; the caller writes each batch's embeddings to
        its rows.
        """
        if self.processor is None:
            raise ValueError("This SLQModel has no processor; pass processor= to from_backbone/from_pretrained.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer.")
        # Huge images are shrunk to the processor's budget while loading (JPEGs decode at reduced scale).
        items = to_items(inputs, budget=image_budget(self.processor))
        max_length = self.max_prompt_length()

        def batches() -> Iterator[tuple[list[int], dict[str, Any]]]:
            if not items:
                return
            # Similar lengths share a batch, so little of it is padding.
            order = sorted(range(len(items)), key=lambda i: items[i].length_key())
            starts = range(0, len(order), batch_size)
            show = len(starts) > 8 if show_progress_bar is None else show_progress_bar
            from tqdm.auto import tqdm

            for start in tqdm(starts, desc="SLQ encode", unit="batch", disable=not show):
                index = order[start : start + batch_size]
                batch = collate(self.processor, [items[i] for i in index], instruction, max_length=max_length)
                yield index, {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        return len(items), batches()

    def max_prompt_length(self) -> int | None:
        """Longest prompt (tokens) that leaves room for the queries within the backbone's positions; ``collate``
        truncates longer user texts to it (with a warning), keeping the chat template's generation prompt."""
        return prompt_length_limit(self.backbone.config, self.processor, reserved=self.max_query_set_size())

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def train(self, mode: bool = True) -> SLQModel:
        """Switch SLQ's own modules to train mode; a frozen backbone stays in eval mode.

        The Trainer calls ``model.train()`` every step. A frozen backbone with dropout would then compute a different
        (random) function than at inference, and two runs of the same step would disagree.
        """
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self


# ------------------------------------------------------------------------------------------------------- helpers
PAIR_SIDES = ("positive", "negative")


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


def _load_backbone(name: str | None, revision: str | None = None, **kwargs) -> PreTrainedModel:
    if not name:
        raise ValueError("SLQConfig.backbone_name_or_path is not set; pass a backbone id or path.")
    model = AutoModelForImageTextToText.from_pretrained(name, revision=revision, **kwargs)
    backbone_spec(model.config.model_type)
    return model.eval()


def _load_processor(path, config: SLQConfig, location: dict, shared: dict):
    # The processor is a stock transformers class (never remote code). Its tokenizer loader peeks at our
    # config.json and warns that "slq" is not its model type; that warning is noise here, so it is silenced.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=False, **location)
    except (OSError, ValueError, KeyError):
        return AutoProcessor.from_pretrained(config.backbone_name_or_path, revision=config.backbone_revision,
                                             trust_remote_code=False, **shared)
    finally:
        hf_logging.set_verbosity(verbosity)


def _resolve_weights(path, location: dict) -> str:
    weights = cached_file(path, WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **location)
    if weights is None:
        pickles = [n for n in ("pytorch_model.bin", "model.pt", "queries.pt")
                   if cached_file(path, n, _raise_exceptions_for_missing_entries=False, **location)]
        hint = (f" It holds {pickles}: pickle files can run arbitrary code when loaded and are never read. Convert "
                "them with `slq-hf convert-reference` in a trusted environment.") if pickles else ""
        raise OSError(f"{path}: no {WEIGHTS_NAME} found.{hint}")
    return weights


def _read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err}). Only safetensors are loaded; a pickle "
                         "file or a truncated download ends up here.") from err
