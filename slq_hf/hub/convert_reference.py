"""``convert_reference``: queries trained by the SLQ paper's research code (a ``torch.save`` tensor) -> SLQ folder."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch


def convert_reference(queries_path: str | os.PathLike, backbone: str, out_dir: str | os.PathLike, *,
                      num_queries: int | None = None, revision: str | None = None, temperature: float = 0.07,
                      **backbone_kwargs) -> Path:
    """Turn queries trained with the paper's research code into an SLQ folder.

    Args:
        queries_path: ``torch.save`` file holding a tensor ``[N_q, hidden]`` (or ``[hidden]``: one query vector,
            repeated ``num_queries`` times, as research code that broadcasts a single query does). A dict with a
            ``meta_queries``/``queries`` entry is accepted too. Read with ``torch.load(weights_only=True)``: files
            holding pickled code are refused.
        backbone: Hub id or local path of the backbone the queries were trained on (its hidden size must match).
        out_dir: the SLQ folder to write (save_pretrained layout).
        num_queries: for a ``[N_q, hidden]`` tensor, must equal N_q if given; for ``[hidden]``, how many query slots
            the vector fills (default 1).
        revision: backbone revision to load and pin.
        temperature: contrastive temperature stored with the queries (research files hold only the queries).
        **backbone_kwargs: go to the backbone's ``from_pretrained`` (``dtype``, ``device_map``...).
    """
    from transformers import AutoConfig

    from ..modeling import SLQModel
    from ..modeling.checkpoint import check_save_target

    path = Path(queries_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(num_queries, int)
                                    or num_queries < 1):
        raise ValueError(f"num_queries={num_queries!r} (--num-queries) is invalid; expected a positive integer.")
    try:
        # weights_only: a pickle can run any code on load; only tensors and plain containers are accepted.
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors (pickled code or "
                         f"classes), which torch.load(weights_only=True) does not execute, or it is not a torch.save "
                         f"file at all. Re-save the queries as a plain tensor: torch.save(queries.detach().cpu(), "
                         f"path). Details: {err}") from err
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as err:  # KeyError: a text file's first byte
        raise ValueError(f"{path}: not a readable torch.save file ({err}).") from err
    if isinstance(tensor, Mapping):  # a dict of tensors: its one tensor, or its queries entry
        tensors = {k: v for k, v in tensor.items() if isinstance(v, torch.Tensor)}
        named = [k for k in ("meta_queries", "queries", "latent_queries") if k in tensors][:1] or list(tensors)
        if len(named) != 1:
            raise ValueError(f"{path}: a dict with keys {sorted(map(str, tensor))[:10]}; expected a tensor, or a dict "
                             "with one tensor or a 'meta_queries'/'queries' entry.")
        tensor = tensors[named[0]]
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(tensor).__name__}; expected a tensor [N_q, hidden] or [hidden].")
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):  # float8 has no isfinite
        raise ValueError(f"{path}: the queries have dtype {tensor.dtype}; expected a float32, float16, bfloat16 or "
                         "float64 tensor.")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0).expand(num_queries or 1, -1)  # (N_q, H): one vector in every slot
    elif tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]  # (1, N_q, H) as saved from a batched parameter
    if tensor.ndim != 2:
        raise ValueError(f"{path}: queries have shape {tuple(tensor.shape)}; expected [N_q, hidden] or [hidden].")
    if tensor.shape[0] == 0:
        raise ValueError(f"{path}: holds 0 queries (shape {tuple(tensor.shape)}); expected at least one.")
    if num_queries is not None and tensor.shape[0] != num_queries:
        raise ValueError(f"{path}: holds {tensor.shape[0]} queries but num_queries={num_queries} (--num-queries) was "
                         "given.")
    tensor = tensor.float()  # as saved; float64 beyond float32's range becomes Inf here, so check after
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: the queries contain NaN or Inf values (in float32).")
    check_save_target(out_dir)  # a folder of another model (e.g. --out = --backbone) fails before the backbone loads
    # The width check reads the backbone's config only (no weights), so a mismatch fails early and clearly.
    text_config = AutoConfig.from_pretrained(backbone, revision=revision).get_text_config()
    hidden_size, width = getattr(text_config, "hidden_size", None), tensor.shape[1]
    if hidden_size is not None and hidden_size != width:
        raise ValueError(f"{path}: the queries are {width} wide, but the backbone {backbone!r} has hidden size "
                         f"{hidden_size}. They were trained for a different backbone; pass the one they were "
                         "trained on (--backbone).")
    model = SLQModel.from_backbone(backbone, num_queries=tensor.shape[0], revision=revision, temperature=temperature,
                                   **backbone_kwargs)
    state = model.trainable_state_dict()
    state["queries"] = tensor.contiguous()
    model.load_trainable_state(state)  # checks the shape against the loaded embedding width once more
    model.save_pretrained(out_dir)
    return Path(out_dir)
