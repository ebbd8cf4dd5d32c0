"""An SLQ model's frozen backbone as a sentence-transformers ``CrossEncoder`` (``predict`` / ``rank``).

``CrossEncoder(slq_folder)`` on its own cannot host the reranker: the folder's ``config_sentence_transformers.json``
says ``SentenceTransformer``, so the CrossEncoder "converts" it by building its default modules from ``config.json``,
and those only know ``*ForCausalLM`` text models (a ``Transformer`` in ``text-generation`` mode + ``LogitScore``,
i.e. yes/no logits at the last position) or sequence-classification heads; ``SLQModel`` is neither. ``LogitScore``
could express the ``yes_no`` scorer but not ``likelihood`` (a log-softmax at every answer token). A CrossEncoder
does accept custom modules, so :func:`load_cross_encoder` builds one whose single module hands each batch's pairs to
``slq_hf.modeling.reranking.rerank``; pairs of one query in a batch share that query's image prefix.

    from slq_hf.integrations.cross_encoder import load_cross_encoder

    reranker = load_cross_encoder("slq-toy")                 # the backbone is loaded once
    reranker.rank("a red circle in the top left", [image_a, image_b])
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch

from ..modeling.modeling_slq import SLQModel
from ..modeling.reranking import rerank

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


@functools.cache
def rerank_module_class() -> type:
    """The CrossEncoder module class, built on first use: sentence-transformers is an optional dependency."""
    from sentence_transformers.base.modules import Module

    return type("SLQRerankModule", (_SLQRerankModule, Module), {"__module__": __name__})


class _SLQRerankModule:
    """CrossEncoder module: (query, candidate) pairs -> ``features["scores"]`` (B, 1) from the frozen backbone.

    Args:
        model: the SLQ model whose backbone and processor score the pairs (nothing is copied).
        scorer: ``"likelihood"`` or ``"yes_no"``.
        **rerank_kwargs: more :func:`~slq_hf.modeling.reranking.rerank` options (``prompt``, ``yes_no``, ...).
    """

    config_keys = ["scorer"]
    modalities = ["text", "image", ("text", "image"), ("image", "text"), "message"]

    def __init__(self, model: SLQModel, scorer: str = "likelihood", **rerank_kwargs: Any):
        super().__init__()  # sentence-transformers' Module (see rerank_module_class)
        self.slq = model
        self.scorer = scorer
        self.rerank_kwargs = rerank_kwargs

    def preprocess(self, inputs: list, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        # Pairs stay as given: the reranker validates and templates them itself, exactly like SLQModel.encode.
        if prompt:
            raise ValueError("SLQ's reranker takes no CrossEncoder prompt; pass rerank options (prompt=, yes_no=) to "
                             "load_cross_encoder instead.")
        return {"pairs": [tuple(pair) for pair in inputs]}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        pairs = features["pairs"]
        scores = torch.empty(len(pairs), dtype=torch.float32)
        groups: dict[int, list[int]] = {}
        for index, (query, _) in enumerate(pairs):  # rank() sends one query object with every candidate
            groups.setdefault(id(query), []).append(index)
        for indices in groups.values():
            result = rerank(self.slq.backbone, self.slq.processor, pairs[indices[0]][0],
                            [pairs[i][1] for i in indices], self.scorer, batch_size=max(1, len(indices)),
                            show_progress_bar=False, **self.rerank_kwargs)
            scores[indices] = result.scores
        features["scores"] = scores[:, None].to(self.slq.device)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        raise NotImplementedError("Save the SLQ model itself (model.save_pretrained) and rebuild the CrossEncoder "
                                  "with load_cross_encoder(folder): the reranker has no weights of its own.")


def load_cross_encoder(model: str | os.PathLike | SLQModel, scorer: str = "likelihood", *, device: str | None = None,
                       **rerank_kwargs: Any) -> CrossEncoder:
    """A ``CrossEncoder`` scoring pairs with an SLQ model's frozen backbone.

    Args:
        model: an SLQ folder / Hub id, or an already loaded ``SLQModel`` (its backbone is shared, not copied).
        scorer: ``"likelihood"`` (any captioning backbone) or ``"yes_no"`` (instruction-tuned backbones).
        **rerank_kwargs: :func:`~slq_hf.modeling.reranking.rerank` options (``prompt``, ``yes_no``,
            ``end_of_turn``).

    Returns:
        A CrossEncoder whose ``predict([(query, candidate), ...])`` returns raw scores (no sigmoid: log-probabilities
        or logit differences) and whose ``rank(query, candidates)`` orders them, best first.
    """
    from sentence_transformers import CrossEncoder

    if not isinstance(model, SLQModel):
        model = SLQModel.from_pretrained(model)
    module = rerank_module_class()(model, scorer, **rerank_kwargs)
    return CrossEncoder(modules=[module], activation_fn=torch.nn.Identity(), device=device or str(model.device))
