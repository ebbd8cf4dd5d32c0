"""Sending an SLQ model to another process (pickle), e.g. to the workers of sentence-transformers' multi-process pool.

transformers 5 records hidden states (LLaVA and InternVL read a vision layer's hidden states on every call) through
two pieces of process-local state, and both break a pickled copy:

- forward hooks it installs lazily on first use: local closures, which pickle cannot serialise at all.
  :func:`without_capture_hooks` gives the pickled copy a module tree without them; transformers re-installs them in
  the new process on first use.
- a process-global registry of what each model class can record, filled in ``PreTrainedModel.__init__``. An unpickled
  model never ran ``__init__`` in the new process, so nothing would be recorded and LLaVA's vision tower would fail.
  :func:`register_output_recorders` fills it in.

Ships inside every checkpoint (remote code): torch/transformers only.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn
from transformers import PreTrainedModel

# Where transformers defines the hook closures (transformers.utils.output_capturing.install_output_capuring_hook).
_CAPTURE_HOOK_MODULE = "transformers.utils.output_capturing"
# transformers marks a model whose hooks are installed; the copy must not carry the mark without the hooks.
_INSTALLED_FLAG = "_output_capturing_hooks_installed"
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def without_capture_hooks(module: nn.Module | None) -> nn.Module | None:
    """``module`` itself when no capture hook sits in its tree, else a shallow copy of the tree without them.

    Shallow: parameters, buffers and every other attribute are shared with the original, which is left untouched, so
    the copy costs no tensor memory.
    """
    if module is None:
        return None
    children = OrderedDict((name, without_capture_hooks(child)) for name, child in module._modules.items())
    hooks = module.__dict__.get("_forward_hooks") or {}
    dropped = {key for key, hook in hooks.items() if getattr(hook, "__module__", None) == _CAPTURE_HOOK_MODULE}
    unchanged = all(children[name] is child for name, child in module._modules.items())
    if not dropped and _INSTALLED_FLAG not in module.__dict__ and unchanged:
        return module
    clone = copy.copy(module)  # new __dict__, same attribute values
    clone.__dict__.pop(_INSTALLED_FLAG, None)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = OrderedDict((k, v) for k, v in module.__dict__[name].items() if k not in dropped)
    clone.__dict__["_modules"] = children
    return clone


def register_output_recorders(model: nn.Module) -> None:
    """Register every ``PreTrainedModel`` class in ``model``'s tree with transformers' output-recording registry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers version without the registry needs nothing here
        return
    # Keyed by str(class) in every version; plain dict access because older transformers (5.20) has a plain dict there
    # (its get/setitem take that key) and later ones a dict subclass whose get/setitem take the model.
    for module in model.modules():
        key = str(module.__class__)
        if isinstance(module, PreTrainedModel) and not dict.get(_CAN_RECORD_REGISTRY, key):
            dict.__setitem__(_CAN_RECORD_REGISTRY, key, getattr(module, "_can_record_outputs", None))
