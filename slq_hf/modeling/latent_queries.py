"""LatentQueries: the named query sets of an SLQ model, the one place queries live.

A query set is a (N_q, H) block of trainable input embeddings appended after every prompt. Sets are keyed by name in
one ``ParameterDict`` (peft's adapter pattern); ``"default"`` is just the name of the set that ``config.num_queries``
sizes and that ``model.safetensors`` stores as ``"queries"``. More sets (``"query"`` / ``"document"`` for asymmetric
retrieval, one per domain, ...) sit next to it; the backbone is shared and unchanged, so it still generates.

The active set is model-wide (:meth:`LatentQueries.set_active`) unless a :meth:`LatentQueries.use` block selects
another one: that choice is held in a ``ContextVar``, so it applies to the calling thread (or asyncio task) only.

Ships inside every checkpoint (remote code): torch + siblings only.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .checkpoint import DEFAULT_QUERY_SET, check_query_set_name
from .configuration_slq import QUERY_INIT_CHOICES

# use_query_set blocks, per thread / task: {id(LatentQueries): names of the open blocks, innermost last}. Never
# mutated, only replaced and reset.
_SCOPED_ACTIVE: ContextVar[dict[int, tuple[str, ...]] | None] = ContextVar("slq_scoped_query_set", default=None)


class LatentQueries(nn.ParameterDict):
    """Named (N_q, H) float32 query sets; ``"default"`` always exists.

    Args:
        hidden_size: H, the backbone's embedding width.
        num_queries: N_q of the default set.
        rows: (S, H) float32 sample of the backbone's token embeddings (trained, non-special ids only): the scale
            and the rows new sets are initialised from.
        init: ``"normal"`` (Gaussian with the rows' std) or ``"vocab"`` (distinct rows of the sample).
        source: what the queries belong to, named in error messages (the backbone id).
        max_queries: most queries a set may have (the backbone's positions minus one for the prompt); None: no limit.
    """

    def __init__(self, hidden_size: int, num_queries: int, rows: torch.Tensor, init: str = "normal",
                 source: str = "the backbone", device: torch.device | None = None, max_queries: int | None = None):
        super().__init__()
        if init not in QUERY_INIT_CHOICES:
            raise ValueError(f"query_init={init!r} is not supported; allowed values are {list(QUERY_INIT_CHOICES)}.")
        self.hidden_size, self.init, self.source, self._active = hidden_size, init, source, DEFAULT_QUERY_SET
        self.max_queries = max_queries
        # "normal" needs only the scale; "vocab" keeps the sample (a few MB for a 2B backbone) to draw rows from.
        self._std = rows.float().std().item()
        self._rows = rows.float().cpu() if init == "vocab" else None
        # Seed 0 for the default set (what every earlier release drew), the name's CRC for the others: distinct
        # starting points, the same for the same name.
        self.add(DEFAULT_QUERY_SET, num_queries, device=device, seed=0)

    # ---------------------------------------------------------------------------------------------- registry
    @property
    def names(self) -> list[str]:
        """Set names, ``"default"`` first, then in the order they were added."""
        return list(self.keys())

    @property
    def active(self) -> str:
        """The set used when none is named: the calling thread's :meth:`use` block, else :meth:`set_active`'s."""
        return (_SCOPED_ACTIVE.get() or {}).get(id(self), (self._active,))[-1]

    @property
    def model_active(self) -> str:
        """The model-wide active set (:meth:`set_active`), whatever a :meth:`use` block selects; what a save keeps."""
        return self._active

    def lookup(self, name: str) -> nn.Parameter:
        """(N_q, H) queries of set ``name`` (the parameter itself); KeyError listing the sets otherwise."""
        if name not in self:
            raise KeyError(f"No query set named {name!r}; this model has {self.names}. Add one with "
                           "add_query_set(name) or load_query_set(path, name=...).")
        return self[name]

    def checked(self, names: str | Sequence[str]) -> list[str]:
        """``names`` as a list of existing, distinct set names (ValueError/KeyError otherwise)."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("query_sets is empty; name at least one set (see model.query_sets).")
        if len(set(names)) != len(names):
            raise ValueError(f"query_sets={names} names a set twice.")
        for name in names:
            self.lookup(name)
        return names

    def add(self, name: str, num_queries: int | None = None, *, queries: torch.Tensor | None = None,
            trainable: bool = True, device: torch.device | None = None, seed: int | None = None) -> nn.Parameter:
        """Add set ``name``: a copy of ``queries`` (N_q, H), or ``num_queries`` rows drawn from the embedding sample.

        Raises ValueError for a taken or invalid name, a bad ``num_queries`` or queries that do not fit.
        """
        check_query_set_name(name)
        if name in self:
            raise ValueError(f"A query set named {name!r} already exists ({self.names}); pick another name or "
                             "load_query_set(...) to replace it.")
        if same := [n for n in self.names if n.casefold() == name.casefold()]:
            raise ValueError(f"Query set name {name!r} differs from the set {same[0]!r} only in case: on macOS and "
                             "Windows their files would be one file. Pick another name.")
        if queries is not None:
            queries = self.validate(queries, f"queries= for set {name!r}")
            if num_queries is not None and num_queries != queries.shape[0]:
                raise ValueError(f"num_queries={num_queries} but queries= holds {queries.shape[0]} rows.")
        elif isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries={num_queries!r} is invalid; expected a positive integer.")
        self.check_fits(name, num_queries if queries is None else queries.shape[0])
        if queries is None:
            queries = self.initial(num_queries, zlib.crc32(name.encode()) if seed is None else seed)
        if device is None and len(self):
            device = self[DEFAULT_QUERY_SET].device
        self[name] = nn.Parameter(queries.detach().to(device=device, dtype=torch.float32).clone(),
                                  requires_grad=trainable)
        return self[name]

    def replace(self, name: str, queries: torch.Tensor, source: str) -> None:
        """Put ``queries`` into set ``name``: a new set is added last; an existing one keeps its place in
        :attr:`names` and whether it is trainable (the default set also keeps its size)."""
        queries = self.validate(queries, source)
        if name not in self:
            self.add(name, queries=queries)
            return
        old = self[name]
        if name == DEFAULT_QUERY_SET and queries.shape != old.shape:
            raise ValueError(f"{source}: {queries.shape[0]} queries cannot replace the default set, which has "
                             f"{old.shape[0]} (config.num_queries); load it under another name.")
        if old.shape == queries.shape:
            with torch.no_grad():
                old.copy_(queries.to(old))
            return
        self.check_fits(name, queries.shape[0])
        # Assigning to an existing key keeps its position in the dict (pop + add would move the set last).
        self[name] = nn.Parameter(queries.detach().to(device=old.device, dtype=torch.float32).clone(),
                                  requires_grad=old.requires_grad)

    def check_fits(self, name: str, count: int) -> None:
        """Refuse a set of ``count`` queries that cannot fit after a prompt (called before anything is allocated)."""
        if self.max_queries is not None and count > self.max_queries:
            raise ValueError(f"Query set {name!r} would have {count} queries, but at most {self.max_queries} fit "
                             f"after a prompt within the positions of {self.source}.")

    def remove(self, name: str) -> None:
        """Drop set ``name`` (not the default set, nor one an open :meth:`use` block of the calling thread names); the
        active set falls back to ``"default"``."""
        if name == DEFAULT_QUERY_SET:
            raise ValueError("The default query set holds config.num_queries queries (model.safetensors) and cannot "
                             "be removed.")
        self.lookup(name)
        if name in (_SCOPED_ACTIVE.get() or {}).get(id(self), ()):  # also an outer block's: it resumes after this
            raise ValueError(f"Query set {name!r} is the active set of the calling use_query_set block or of one "
                             "around it; remove it after the block.")
        del self[name]
        if self._active == name:
            self._active = DEFAULT_QUERY_SET

    def set_active(self, name: str) -> None:
        """Make ``name`` the model-wide default set for embed/encode/forward (and so training)."""
        self.lookup(name)
        self._active = name

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """``name`` is the active set inside the block, for the calling thread / task only."""
        self.lookup(name)
        scoped = _SCOPED_ACTIVE.get() or {}
        token = _SCOPED_ACTIVE.set({**scoped, id(self): (*scoped.get(id(self), ()), name)})
        try:
            yield
        finally:
            _SCOPED_ACTIVE.reset(token)

    def max_size(self) -> int:
        """Largest N_q over all sets: the positions a prompt must leave free."""
        return max(p.shape[0] for p in self.values())

    # ------------------------------------------------------------------------------------- init / validation
    @torch.no_grad()
    def initial(self, count: int, seed: int) -> torch.Tensor:
        """(count, H) float32 on CPU: Gaussian at the embedding scale, or distinct rows of the embedding sample."""
        generator = torch.Generator().manual_seed(seed)
        if self.init == "vocab":
            if count > self._rows.shape[0]:
                raise ValueError(f"query_init='vocab' needs {count} distinct token embeddings but {self.source} "
                                 f"has only {self._rows.shape[0]} usable ones; use query_init='normal'.")
            return self._rows[torch.randperm(self._rows.shape[0], generator=generator)[:count]].clone()
        return torch.randn((count, self.hidden_size), generator=generator) * self._std

    def validate(self, queries: Any, source: str) -> torch.Tensor:
        """``queries`` if it is a finite float (N_q, H) tensor of this width; ValueError naming ``source``."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[0] < 1:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"{source}: expected a (num_queries, hidden_size) tensor of queries, got {shape}.")
        if queries.shape[1] != self.hidden_size:
            raise ValueError(f"{source}: the queries are {queries.shape[1]} wide but this model's backbone "
                             f"{self.source} has hidden size {self.hidden_size}. A query set only runs on the "
                             "backbone it was trained for (same width); load it onto that backbone.")
        if not queries.is_floating_point():
            raise ValueError(f"{source}: the queries have dtype {queries.dtype}; expected a float tensor.")
        if not torch.isfinite(queries).all():
            raise ValueError(f"{source}: the queries contain NaN or Inf values; the file is corrupt (or training "
                             "diverged).")
        return queries
