"""Named query sets: several SLQ embedders on one frozen backbone, computed together on one prompt pass.

A query set is just a (N_q, H) block of latent queries. The backbone never changes, so one loaded model can carry
several sets (e.g. ``"query"`` and ``"document"`` for asymmetric retrieval, one per domain, ...) next to the built-in
``"default"`` set (``SLQModel.queries``, saved in ``model.safetensors``) and still chat with ``backbone.generate``.

Several sets on ONE prompt (``SLQModel.encode(inputs, query_sets=[...])``, ``forward(query_sets=[...])``): the prompt
runs once into a KV cache, then all sets' queries run together in one pass with a block mask (each set causal within
itself, blind to the other sets) and per-set position offsets (every set gets the positions it would get alone). That
is the prefix-cache recipe of ``prefix_cache.py`` with K blocks (DESIGN.md "Training fast path"), so it equals one
separate call per set, with or without grad. Backbones with sliding-window attention layers (Gemma 3) cannot take the
4-D block mask; there, and when the backbone itself is trainable (gradients must reach the prompt) or
``training_path="full"`` is set, each set gets its own full pass instead: same results, no sharing.

Files: every extra set is saved by ``save_pretrained`` as ``query_sets/<name>.safetensors`` (one tensor,
``"queries"`` (N_q, H) float32, plus metadata naming the set and its backbone) and listed with the active set in
``query_sets/sets.json``; ``from_pretrained`` reads them back. ``load_query_set`` loads a set file, or any set of
another SLQ folder / Hub repo, onto any model with the same backbone width. The optional projection head and the
temperature are shared by all sets.

Ships inside every checkpoint (remote code): torch/transformers/safetensors + siblings only.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import ModelOutput, cached_file
from transformers.utils import logging as hf_logging

from .backbones import input_embedding_stats
from .prefix_cache import prefix_cache_query_states
from .safetensors_io import atomic_save_file

logger = hf_logging.get_logger(__name__)

DEFAULT_QUERY_SET = "default"
QUERY_SETS_DIR = "query_sets"
QUERY_SETS_INDEX = f"{QUERY_SETS_DIR}/sets.json"
QUERY_SET_TENSOR = "queries"
# Names become file names and ParameterDict keys (no dots there): keep them to one plain token.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class SLQQuerySetsOutput(ModelOutput):
    """Output of ``SLQModel.forward(..., query_sets=[...])``: one entry per query set, keyed by set name.

    Attributes:
        loss: () mean of the per-set symmetric InfoNCE losses, when a pair batch was given and ``return_loss`` set.
        pooler_outputs: name -> (B, embedding_dim) float32 embeddings.
        query_states: name -> (B, N_q of that set, H) final hidden states at that set's query positions.
        losses: name -> () that set's contrastive loss.
        accuracies: name -> () that set's in-batch retrieval accuracy.
        positive_pooler_outputs: name -> (B, embedding_dim) embeddings of the positive side of a pair batch.
    """

    loss: torch.FloatTensor | None = None
    pooler_outputs: dict[str, torch.Tensor] | None = None
    query_states: dict[str, torch.Tensor] | None = None
    losses: dict[str, torch.Tensor] | None = None
    accuracies: dict[str, torch.Tensor] | None = None
    positive_pooler_outputs: dict[str, torch.Tensor] | None = None


# ------------------------------------------------------------------------------------------------------- helpers
def check_query_set_name(name: Any) -> str:
    """Return ``name`` if it can name a query set (a file name and a module key), else raise ValueError."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"Query set name {name!r} is invalid; use 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it becomes a file name).")
    return name


def has_sliding_window_layers(backbone: nn.Module) -> bool:
    """True when the backbone's language model has sliding-window attention layers (Gemma 3, Mistral with a window).

    Such layers keep only their last window of prompt keys, so the 4-D block mask of several query sets cannot serve
    them (``prefix_cache_query_states`` refuses it); checked up front so the fallback costs no wasted prompt pass.
    """
    text = backbone.config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in str(kind) for kind in layer_types)
    return getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)


def block_causal_mask(sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(Q, Q) bool mask, Q = sum(sizes): each block causal within itself and blind to the other blocks.

    The general form of ``prefix_cache.block_query_mask`` for sets of different sizes.
    """
    return torch.block_diag(*[torch.ones(n, n, dtype=torch.bool, device=device).tril() for n in sizes])


def query_offsets(sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(Q,) position offset of every query from the first query slot: ``arange(n)`` restarted for each set, so each
    set sits at exactly the positions it would take alone after the prompt."""
    return torch.cat([torch.arange(n, device=device) for n in sizes])


def _read_set_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """(queries (N_q, H), metadata) of a query-set file or an SLQ ``model.safetensors``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if QUERY_SET_TENSOR not in keys:
                raise ValueError(f"{path}: holds tensors {keys[:5]} but no {QUERY_SET_TENSOR!r}; not a query set or "
                                 "an SLQ checkpoint.")
            return handle.get_tensor(QUERY_SET_TENSOR), dict(handle.metadata() or {})
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err}). Query sets are only read from "
                         "safetensors files.") from err


def _resolve(path_or_repo: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    return cached_file(str(path_or_repo), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


class QuerySetsMixin:
    """Named query sets for ``SLQModel`` (mixed in before ``PreTrainedModel``).

    Relies on the host's ``queries`` parameter (the ``"default"`` set), ``config``, ``backbone``, ``spec``,
    ``processor``, ``pool``, ``embed``, ``_relay_left`` and ``_use_prefix_cache``. Extra sets live in the
    ``extra_query_sets`` ParameterDict, created on first use so models without extra sets are unchanged.
    """

    _active_query_set: str = DEFAULT_QUERY_SET
    #: Sets that ``forward`` trains jointly on a pair batch when no ``query_sets=`` is given. Lets
    #: ``transformers.Trainer`` (which calls ``forward(**batch)``) train several sets on one prompt pass per side.
    joint_query_sets: list[str] | None = None

    # ----------------------------------------------------------------------------------------------- registry
    @property
    def query_sets(self) -> list[str]:
        """Names of the model's query sets, ``"default"`` (the ``queries`` parameter) first."""
        extra = self._modules.get("extra_query_sets")
        return [DEFAULT_QUERY_SET, *(extra.keys() if extra is not None else ())]

    @property
    def active_query_set(self) -> str:
        """Name of the set ``embed``/``encode``/``forward`` use when no set is named."""
        return self._active_query_set

    @property
    def active_queries(self) -> nn.Parameter:
        """(N_q, H) queries of the active set."""
        return self.get_query_set(self._active_query_set)

    def get_query_set(self, name: str) -> nn.Parameter:
        """(N_q, H) queries of set ``name`` (the trainable parameter itself)."""
        if name == DEFAULT_QUERY_SET:
            return self.queries
        extra = self._modules.get("extra_query_sets")
        if extra is None or name not in extra:
            raise KeyError(f"No query set named {name!r}; this model has {self.query_sets}. Add one with "
                           "add_query_set(name) or load_query_set(path, name=...).")
        return extra[name]

    def add_query_set(self, name: str, num_queries: int | None = None, *, queries: torch.Tensor | None = None,
                      trainable: bool = True) -> nn.Parameter:
        """Add a new query set, initialised like the default set (``config.query_init``) or from ``queries``.

        Args:
            name: new set name (letters, digits, ``_``, ``-``); ``"default"`` is the built-in set.
            num_queries: N_q of the new set; default ``config.num_queries``. Sets may differ in size.
            queries: optional (N_q, H) initial values (e.g. a copy of another set).
            trainable: whether the new queries require grad.

        Returns:
            The new (N_q, H) float32 parameter. The random initialisation is seeded by the name, so two sets never
            start identical and the same name always starts the same.
        """
        check_query_set_name(name)
        if name in self.query_sets:
            raise ValueError(f"A query set named {name!r} already exists ({self.query_sets}); pick another name or "
                             "load_query_set(...) to replace it.")
        if queries is not None:
            queries = self._checked_queries(queries, f"queries= for set {name!r}")
            if num_queries is not None and num_queries != queries.shape[0]:
                raise ValueError(f"num_queries={num_queries} but queries= holds {queries.shape[0]} rows.")
            init = queries
        else:
            count = self.config.num_queries if num_queries is None else num_queries
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"num_queries={num_queries!r} is invalid; expected a positive integer.")
            init = self._initial_queries(count, seed=zlib.crc32(name.encode()))
        param = nn.Parameter(init.detach().to(device=self.device, dtype=torch.float32).clone(),
                             requires_grad=trainable)
        self._extra_store()[name] = param
        return param

    def remove_query_set(self, name: str) -> None:
        """Drop an extra set (the default set cannot be removed); the active set falls back to ``"default"``."""
        if name == DEFAULT_QUERY_SET:
            raise ValueError("The default query set is the model's own `queries` parameter and cannot be removed.")
        self.get_query_set(name)  # raises a KeyError listing the sets
        del self._extra_store()[name]
        if self._active_query_set == name:
            self._active_query_set = DEFAULT_QUERY_SET

    def set_active_query_set(self, name: str) -> None:
        """Make ``name`` the set that ``embed``/``encode``/``forward`` (and so training) use by default."""
        self.get_query_set(name)
        self._active_query_set = name

    @contextmanager
    def use_query_set(self, name: str) -> Iterator[None]:
        """Context manager: ``name`` is the active set inside the block, the previous one again after it."""
        self.get_query_set(name)
        previous, self._active_query_set = self._active_query_set, name
        try:
            yield
        finally:
            self._active_query_set = previous

    def query_set_for_task(self, task: str | None) -> str | None:
        """The set a sentence-transformers ``task`` (``"query"``/``"document"``) selects: the set of that name when
        the model has one, else None (the active set)."""
        return task if isinstance(task, str) and task in self.query_sets else None

    def max_query_set_size(self) -> int:
        """Largest N_q over all sets: the positions a prompt must leave free."""
        return max(self.get_query_set(name).shape[0] for name in self.query_sets)

    def _extra_store(self) -> nn.ParameterDict:
        if self._modules.get("extra_query_sets") is None:
            self.extra_query_sets = nn.ParameterDict()
        return self.extra_query_sets

    @torch.no_grad()
    def _initial_queries(self, count: int, seed: int) -> torch.Tensor:
        """(count, H) float32 on CPU, drawn the way ``SLQModel`` initialises its default set."""
        embedding = self.backbone.get_input_embeddings()
        rows = input_embedding_stats(embedding, num_samples=max(2048, count))  # (S, H)
        generator = torch.Generator().manual_seed(seed)
        if self.config.query_init == "vocab":
            return rows[torch.randperm(rows.shape[0], generator=generator)[:count]].clone()
        return torch.randn((count, rows.shape[1]), generator=generator) * rows.std().item()

    def _checked_queries(self, queries: Any, source: str) -> torch.Tensor:
        """Validate a (N_q, H) block of queries for this backbone; ValueError names the source and both widths."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[0] < 1:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"{source}: expected a (num_queries, hidden_size) tensor of queries, got {shape}.")
        if queries.shape[1] != self.config.hidden_size:
            raise ValueError(
                f"{source}: the queries are {queries.shape[1]} wide but this model's backbone "
                f"{self.config.backbone_name_or_path!r} has hidden size {self.config.hidden_size}. A query set only "
                "runs on the backbone it was trained for (same width); load it onto that backbone."
            )
        if not queries.is_floating_point():
            raise ValueError(f"{source}: the queries have dtype {queries.dtype}; expected a float tensor.")
        if not torch.isfinite(queries).all():
            raise ValueError(f"{source}: the queries contain NaN or Inf values; the file is corrupt (or training "
                             "diverged).")
        return queries

    # ------------------------------------------------------------------------------------------------- files
    def save_query_set(self, name: str, path: str | os.PathLike) -> Path:
        """Write set ``name`` alone to ``path`` (a queries-only safetensors file, a few KB) and return the path.

        The file holds ``"queries"`` (N_q, H) float32; its metadata names the set, its size and the backbone, so
        ``load_query_set`` can warn when it is loaded onto a different backbone.
        """
        queries = self.get_query_set(name)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "pt",
            "library": "slq_hf",
            "slq_query_set": name,
            "num_queries": str(queries.shape[0]),
            "hidden_size": str(queries.shape[1]),
            "backbone_name_or_path": str(self.config.backbone_name_or_path or ""),
            "backbone_model_type": str(self.config.backbone_model_type or ""),
        }
        atomic_save_file({QUERY_SET_TENSOR: queries.detach().float().cpu().contiguous()}, path, metadata)
        return path

    def load_query_set(self, path_or_repo: str | os.PathLike, name: str | None = None, *, query_set: str | None = None,
                       **hub_kwargs) -> str:
        """Load a query set onto this model and return the name it was stored under.

        Args:
            path_or_repo: a query-set file (``*.safetensors`` written by :meth:`save_query_set` or
                ``save_pretrained``), or an SLQ folder / Hub repo id.
            name: name of the set on this model; default: the set's own name. An existing extra set of that name is
                replaced; ``"default"`` overwrites the default set's values (same N_q required).
            query_set: which set of an SLQ folder / repo to load (``"default"`` = its ``model.safetensors`` queries,
                the default); ignored for a set file.
            **hub_kwargs: ``revision``, ``subfolder``, ``token``, ``cache_dir``, ``local_files_only`` for Hub repos.

        Raises:
            ValueError: the queries do not fit this backbone (width mismatch: both widths are named), the file is not
                a readable safetensors set, or no ``name`` is given for a folder's default set.
        """
        source = str(path_or_repo)
        if Path(source).is_file():
            file, source_name = source, None
        else:
            wanted = query_set or DEFAULT_QUERY_SET
            check_query_set_name(wanted)
            filename = "model.safetensors" if wanted == DEFAULT_QUERY_SET else f"{QUERY_SETS_DIR}/{wanted}.safetensors"
            file = _resolve(source, filename, hub_kwargs)
            if file is None:
                raise OSError(f"{source}: no {filename} found; it is neither a query-set file nor an SLQ folder "
                              f"with a query set {wanted!r}.")
            source_name = wanted
        queries, metadata = _read_set_file(file)
        source_name = metadata.get("slq_query_set") or source_name or Path(file).stem
        if name is None:
            if source_name == DEFAULT_QUERY_SET:
                raise ValueError(f"{source}: this is the folder's default set; give it a name on this model, e.g. "
                                 "load_query_set(path, name='document') (or name='default' to overwrite ours).")
            name = source_name
        check_query_set_name(name)
        queries = self._checked_queries(queries, file)
        self._warn_other_backbone(metadata, file)
        if name == DEFAULT_QUERY_SET:
            if queries.shape != self.queries.shape:
                raise ValueError(f"{file}: {queries.shape[0]} queries cannot replace the default set, which has "
                                 f"{self.queries.shape[0]} (config.num_queries); load it under another name.")
            with torch.no_grad():
                self.queries.copy_(queries.to(self.queries))
            return name
        store = self._extra_store()
        trainable = store[name].requires_grad if name in store else True
        store[name] = nn.Parameter(queries.to(device=self.device, dtype=torch.float32).contiguous(),
                                   requires_grad=trainable)
        return name

    def _warn_other_backbone(self, metadata: dict[str, str], file: str) -> None:
        # Only the width is a hard fact (checked above); a different backbone id may be a local mirror of ours.
        theirs = metadata.get("backbone_model_type")
        ours = self.config.backbone_model_type
        if theirs and ours and theirs != ours:
            logger.warning(f"{file}: this query set was trained on a {theirs!r} backbone but this model runs a "
                           f"{ours!r} backbone of the same width; its embeddings will be meaningless.")

    def _load_query_set_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Load the ``extra_query_sets.<name>`` entries of a full ``state_dict()`` (creating missing sets) and return
        the remaining entries, so ``load_state_dict(model.state_dict())`` round-trips a model with extra sets."""
        prefix = "extra_query_sets."
        for key in [k for k in state if k.startswith(prefix)]:
            name = check_query_set_name(key[len(prefix):])
            queries = self._checked_queries(state.pop(key), f"state dict entry {key!r}")
            store = self._extra_store()
            if name in store and store[name].shape == queries.shape:
                with torch.no_grad():
                    store[name].copy_(queries.to(store[name]))
            else:
                store[name] = nn.Parameter(queries.detach().to(device=self.device, dtype=torch.float32).clone())
        return state

    def _save_query_sets(self, out: str | os.PathLike) -> None:
        """Write every extra set and ``query_sets/sets.json`` into an SLQ folder (``save_pretrained`` calls this).

        A model with only the default set (active) writes nothing here, so such folders look as before; files of sets
        that no longer exist are removed so they cannot come back on load.
        """
        folder = Path(out) / QUERY_SETS_DIR
        extra = self.query_sets[1:]
        if not extra and self._active_query_set == DEFAULT_QUERY_SET:
            if folder.is_dir():
                for stale in [*folder.glob("*.safetensors"), folder / "sets.json"]:
                    stale.unlink(missing_ok=True)
                if not any(folder.iterdir()):
                    folder.rmdir()
            return
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.safetensors"):
            if stale.stem not in extra:
                stale.unlink()
        index = {"active": self._active_query_set, "sets": {}}
        for name in extra:
            self.save_query_set(name, folder / f"{name}.safetensors")
            index["sets"][name] = {"file": f"{QUERY_SETS_DIR}/{name}.safetensors",
                                   "num_queries": int(self.get_query_set(name).shape[0])}
        tmp = folder / f".sets.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf8")
        os.replace(tmp, folder / "sets.json")

    def _load_saved_query_sets(self, path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> None:
        """Read the sets listed in ``query_sets/sets.json`` of an SLQ folder / repo (``from_pretrained`` calls this);
        folders without the file (every checkpoint written before query sets existed) load unchanged."""
        index_file = _resolve(path, QUERY_SETS_INDEX, hub_kwargs)
        if index_file is None:
            return
        try:
            index = json.loads(Path(index_file).read_text(encoding="utf8"))
            sets, active = dict(index["sets"]), index.get("active", DEFAULT_QUERY_SET)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: {QUERY_SETS_INDEX} is not a valid query-set index ({err}).") from err
        for name in sets:
            check_query_set_name(name)
            if name == DEFAULT_QUERY_SET:
                raise ValueError(f"{path}: {QUERY_SETS_INDEX} lists a set named 'default'; the default set lives in "
                                 "model.safetensors.")
            file = _resolve(path, f"{QUERY_SETS_DIR}/{name}.safetensors", hub_kwargs)
            if file is None:
                raise OSError(f"{path}: {QUERY_SETS_INDEX} lists query set {name!r} but "
                              f"{QUERY_SETS_DIR}/{name}.safetensors is missing.")
            queries, _ = _read_set_file(file)
            self._extra_store()[name] = nn.Parameter(self._checked_queries(queries, file).to(self.device).float())
        self.set_active_query_set(active)

    # ----------------------------------------------------------------------------------------------- compute
    def _check_set_names(self, query_sets: str | Sequence[str]) -> list[str]:
        names = [query_sets] if isinstance(query_sets, str) else list(query_sets)
        if not names:
            raise ValueError("query_sets is empty; name at least one set (see model.query_sets).")
        if len(set(names)) != len(names):
            raise ValueError(f"query_sets={names} names a set twice.")
        for name in names:
            self.get_query_set(name)
        return names

    def shares_prompt_across_query_sets(self) -> bool:
        """Whether several sets can share one prompt pass (prefix cache + block mask) on this model.

        Not on sliding-window backbones (no 4-D mask there), not with ``training_path="full"`` (a backbone without a
        usable KV cache), and not under grad with a trainable backbone (the prompt would need gradients).
        """
        if has_sliding_window_layers(self.backbone) or self.config.training_path == "full":
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()))

    def embed_query_sets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         query_sets: str | Sequence[str] = (), **backbone_inputs
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Run several query sets on one prompt pass.

        Args:
            input_ids: (B, L) token ids, left or right padded.
            attention_mask: (B, L).
            query_sets: set names (see :attr:`query_sets`).
            **backbone_inputs: pixel_values, image_grid_thw, mm_token_type_ids, ... as the processor returned them.

        Returns:
            name -> (pooled (B, embedding_dim) float32, query_states (B, N_q of the set, H)), in the order given.
            Equal (to float tolerance) to ``embed`` with each set active; grads reach every set's queries.
        """
        names = self._check_set_names(query_sets)
        if len(names) == 1 or not self.shares_prompt_across_query_sets():
            out = {}
            for name in names:  # fallback: one full pass per set (see the module docstring for when)
                with self.use_query_set(name):
                    out[name] = self.embed(input_ids, attention_mask, **backbone_inputs)
            return out
        backbone_inputs = {k: v for k, v in backbone_inputs.items() if v is not None}
        ids, mask, relaid = self._relay_left(input_ids, attention_mask, backbone_inputs, num_queries=0)  # (B, L)
        backbone_inputs.update(relaid)
        blocks = [self.get_query_set(name) for name in names]
        sizes = [block.shape[0] for block in blocks]
        states = prefix_cache_query_states(
            self.backbone.base_model, self.spec, ids, mask, torch.cat(blocks), backbone_inputs,
            offsets=query_offsets(sizes, ids.device), query_mask=block_causal_mask(sizes, ids.device),
        )  # (B, sum(sizes), H)
        return {name: (self.pool(part), part) for name, part in zip(names, states.split(sizes, dim=1))}

    def forward_query_sets(self, query_sets: str | Sequence[str], sides: dict[str, dict[str, Any]],
                           return_loss: bool = True, **inputs) -> SLQQuerySetsOutput:
        """``forward`` with several sets: every side of the batch runs ONE prompt pass for all sets.

        Args:
            query_sets: set names.
            sides: the ``positive`` / ``negative`` sides of a pair batch (``_split_pair_sides``), possibly empty.
            return_loss: compute each set's symmetric InfoNCE when a positive side is given; ``loss`` is their mean.
            **inputs: the plain (query) side: input_ids, attention_mask, pixel_values, ...

        Returns:
            SLQQuerySetsOutput keyed by set name.
        """
        names = self._check_set_names(query_sets)
        query = self.embed_query_sets(query_sets=names, **inputs)
        pooled = {name: query[name][0] for name in names}
        states = {name: query[name][1] for name in names}
        if "positive" not in sides:
            return SLQQuerySetsOutput(pooler_outputs=pooled, query_states=states)
        positive = {k: v[0] for k, v in self.embed_query_sets(query_sets=names, **sides["positive"]).items()}
        negative = ({k: v[0] for k, v in self.embed_query_sets(query_sets=names, **sides["negative"]).items()}
                    if "negative" in sides else None)
        for name in names:
            if positive[name].shape != pooled[name].shape:
                raise ValueError(f"The positive side has {positive[name].shape[0]} rows but the query side has "
                                 f"{pooled[name].shape[0]}; a pair batch needs one positive per query.")
        if not return_loss:
            return SLQQuerySetsOutput(pooler_outputs=pooled, query_states=states, positive_pooler_outputs=positive)
        from .losses import symmetric_infonce
        from .modeling_slq import MAX_LOGIT_SCALE

        losses, accuracies = {}, {}
        for name in names:  # one loss per set: each set is its own embedder, sharing only the temperature
            result = symmetric_infonce(pooled[name], positive[name], self.logit_scale,
                                       negative[name] if negative else None, max_logit_scale=MAX_LOGIT_SCALE)
            losses[name], accuracies[name] = result.loss, result.accuracy
        loss = torch.stack(list(losses.values())).mean()
        return SLQQuerySetsOutput(loss=loss, pooler_outputs=pooled, query_states=states, losses=losses,
                                  accuracies=accuracies, positive_pooler_outputs=positive)

    @torch.inference_mode()
    def encode_query_sets(self, inputs: Any, query_sets: str | Sequence[str], batch_size: int = 8,
                          show_progress_bar: bool | None = None, instruction: str | None = None
                          ) -> dict[str, torch.Tensor]:
        """``encode`` for several sets at once: each batch's prompts run once, all sets' queries together.

        Returns:
            name -> float32 (N, embedding_dim) on CPU, rows in input order; equal to ``encode`` with that set active.
        """
        names = self._check_set_names(query_sets)
        # The same batches as ``encode`` (SLQModel._encode_batches), so each set's rows equal encode with it active.
        count, batches = self._encode_batches(inputs, batch_size, show_progress_bar, instruction)
        out = {name: torch.empty(count, self.config.embedding_dim, dtype=torch.float32) for name in names}
        for index, batch in batches:
            result = self(**batch, query_sets=names).pooler_outputs
            for name in names:
                out[name][index] = result[name].float().cpu()
        return out
