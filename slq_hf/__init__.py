"""slq_hf: Shared Latent Queries (SLQ) embedding models on frozen Hugging Face vision-language backbones."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["SLQConfig", "SLQModel", "SLQModelOutput", "__version__"]

# Attributes resolved on first use (PEP 562), so `import slq_hf` (and `slq-hf --help`) costs no torch/transformers.
_LAZY = {"SLQConfig": "slq_hf.modeling", "SLQModel": "slq_hf.modeling", "SLQModelOutput": "slq_hf.modeling"}
_WATCHED = ("transformers", "slq_hf.modeling")


def register() -> None:
    """Register "slq" with AutoConfig/AutoModel, so AutoModel.from_pretrained(slq_dir) needs no trust_remote_code.
    Idempotent; exist_ok because remote-code loading may already have registered the same names."""
    from transformers import AutoConfig, AutoModel

    from .modeling import SLQConfig, SLQModel

    AutoConfig.register("slq", SLQConfig, exist_ok=True)
    AutoModel.register(SLQConfig, SLQModel, exist_ok=True)


def _initialising(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_when_ready() -> None:
    # slq_hf.modeling imports transformers itself: when transformers finishes inside that import, registering now
    # would re-enter the half-imported slq_hf.modeling; its own completion registers instead.
    if not _initialising("slq_hf.modeling") and not _initialising("transformers"):
        register()


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers right after `transformers` or `slq_hf.modeling` finishes importing, whichever completes the pair:
    `import slq_hf` stays free of both, and registration still precedes any AutoModel call."""

    def __init__(self) -> None:
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED or fullname in self._loaders:
            return None
        self._loaders[fullname] = None  # keeps the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders[module.__spec__.name].exec_module(module)
        if all(name in self._loaders for name in _WATCHED) and self in sys.meta_path:
            sys.meta_path.remove(self)
        module.__spec__._initializing = False
        _register_when_ready()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "__version__":
        from .modeling.version import SLQ_HF_VERSION

        return SLQ_HF_VERSION
    raise AttributeError(f"module 'slq_hf' has no attribute {name!r}")


if "transformers" in sys.modules:
    register()  # imports slq_hf.modeling, which needs nothing but transformers and torch
else:
    sys.meta_path.insert(0, _RegisterOnImport())
