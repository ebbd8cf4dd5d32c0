"""slq_hf: Shared Latent Queries (SLQ) embedding models on frozen Hugging Face vision-language backbones."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["SLQConfig", "SLQModel", "SLQModelOutput", "__version__"]

# Attributes resolved on first use (PEP 562), so `import slq_hf` (and `slq-hf --help`) costs no torch/transformers.
_LAZY = {"SLQConfig": "slq_hf.modeling", "SLQModel": "slq_hf.modeling", "SLQModelOutput": "slq_hf.modeling"}


def register() -> None:
    """Register "slq" with AutoConfig/AutoModel, so AutoModel.from_pretrained(slq_dir) needs no trust_remote_code.
    Idempotent; exist_ok because remote-code loading may already have registered the same names."""
    from transformers import AutoConfig, AutoModel

    from .modeling import SLQConfig, SLQModel

    AutoConfig.register("slq", SLQConfig, exist_ok=True)
    AutoModel.register(SLQConfig, SLQModel, exist_ok=True)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs register() right after `transformers` is first imported: `import slq_hf` stays free of it, and
    registration still precedes any AutoModel call (which needs transformers imported)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "__version__":
        from .modeling.version import SLQ_HF_VERSION

        return SLQ_HF_VERSION
    raise AttributeError(f"module 'slq_hf' has no attribute {name!r}")


if "transformers" in sys.modules:
    register()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
