"""Retrieval metrics on similarity or embedding matrices (pure torch, no model needed).

Conventions (COCO / Flickr30K, as in VSE++ and CLIP evaluations):

- image→text: a query image is a hit at k if ANY of its captions is among the top k texts.
- text→image: every caption is a query; its own image must be among the top k images.
- rank: 0-based number of NON-positive candidates scoring at least as high as the best positive. Ties count
  against the query, so a collapsed model whose embeddings are all equal scores 0, never 100.
- mean / median rank are reported 1-based (rank 1 = the best positive is first).
- recall values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_ROW_BLOCK = 512


def _as_matrix(name: str, value, ndim: int = 2) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D matrix, got shape {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def cosine_similarity_matrix(queries, candidates, normalize: bool = True) -> torch.Tensor:
    """(Q, D) x (C, D) -> (Q, C) similarities; cosine when ``normalize`` (the default), else dot product."""
    q, c = _as_matrix("queries", queries), _as_matrix("candidates", candidates)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries are {q.shape[1]}-dimensional but candidates are {c.shape[1]}-dimensional.")
    if not (torch.isfinite(q).all() and torch.isfinite(c).all()):
        raise ValueError("Embeddings contain NaN or Inf; the model produced invalid outputs.")
    if normalize:
        q, c = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(c, dim=-1)
    return q @ c.T


def ranks_from_similarity(similarity, positives, exclude=None) -> torch.Tensor:
    """0-based rank of the best positive for every query row.

    Args:
        similarity: (Q, C) scores, higher = more similar.
        positives: (Q, C) bool, True where the candidate is a correct answer; every row needs at least one.
        exclude: optional (Q, C) bool, True where the candidate is removed from that query's list (e.g. the
            reference image of a composed query). Excluded candidates never count, positive or not.

    Returns:
        (Q,) int64: number of non-positive, non-excluded candidates scoring >= the best positive's score.
    """
    sim = _as_matrix("similarity", similarity)
    pos = torch.as_tensor(positives, dtype=torch.bool)
    if pos.shape != sim.shape:
        raise ValueError(f"positives has shape {tuple(pos.shape)} but similarity has {tuple(sim.shape)}.")
    if exclude is not None:
        exc = torch.as_tensor(exclude, dtype=torch.bool)
        if exc.shape != sim.shape:
            raise ValueError(f"exclude has shape {tuple(exc.shape)} but similarity has {tuple(sim.shape)}.")
        pos = pos & ~exc
    else:
        exc = None
    missing = (~pos.any(dim=1)).nonzero().flatten()
    if len(missing):
        raise ValueError(f"Query rows {missing[:10].tolist()} have no (non-excluded) positive candidate; a rank is "
                         "undefined for them.")
    ranks = torch.empty(sim.shape[0], dtype=torch.long)
    # Row blocks bound the temporaries: COCO-5K text→image is 25k x 5k, several (Q, C) copies would be gigabytes.
    for start in range(0, sim.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        s, p = sim[rows], pos[rows]
        best = s.masked_fill(~p, float("-inf")).amax(dim=1, keepdim=True)  # (q, 1)
        competitors = ~p if exc is None else ~p & ~exc[rows]  # (q, C)
        ranks[rows] = ((s >= best) & competitors).sum(dim=1)
    return ranks


def recall_from_ranks(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """(Q,) 0-based ranks -> {"R@k": fraction of queries with rank < k, "mean_rank", "median_rank" (1-based),
    "num_queries"}."""
    ranks = torch.as_tensor(ranks)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}.")
    out: dict[str, float] = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Recall cut-off k={k!r} is invalid; expected a positive integer.")
        out[f"R@{k}"] = (ranks < k).double().mean().item()
    one_based = ranks.double() + 1
    out["mean_rank"] = one_based.mean().item()
    # Lower median, as torch.median does: an integer rank that some query actually has.
    out["median_rank"] = one_based.median().item()
    out["num_queries"] = len(ranks)
    return out


def _positives_from_assignment(text_to_image, num_images: int) -> torch.Tensor:
    owner = torch.as_tensor(text_to_image, dtype=torch.long)
    if owner.ndim != 1:
        raise ValueError(f"text_to_image must be 1-D (one image index per text), got shape {tuple(owner.shape)}.")
    if len(owner) and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(f"text_to_image holds indices outside [0, {num_images}); got min {owner.min().item()}, "
                         f"max {owner.max().item()}.")
    return owner[:, None] == torch.arange(num_images)[None, :]  # (T, I)


def normalize_caption(text: str) -> str:
    """The key under which two captions are duplicates: case-folded, whitespace-collapsed, final period dropped."""
    return " ".join(text.casefold().split()).rstrip(".").strip()


def duplicate_positives(text_to_image, texts: Sequence[str], num_images: int) -> torch.Tensor:
    """(T, I) bool: text t is a correct answer for image i if i owns t or owns a caption equal to t.

    Equality is on :func:`normalize_caption`. This is the "duplicates count as hits" relaxation: in a set where two
    images share the caption "a red square", retrieving either image for that caption is not an error.
    """
    owner = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(texts) != len(owner):
        raise ValueError(f"{len(texts)} texts but text_to_image has {len(owner)} entries.")
    keys = [normalize_caption(t) for t in texts]
    ids = {key: n for n, key in enumerate(dict.fromkeys(keys))}
    key_ids = torch.tensor([ids[k] for k in keys], dtype=torch.long)  # (T,)
    _positives_from_assignment(owner, num_images)  # validates the indices
    # key_has_image[k, i]: some caption with key k belongs to image i.
    key_has_image = torch.zeros(len(ids), num_images, dtype=torch.bool)
    key_has_image[key_ids, owner] = True
    return key_has_image[key_ids]  # (T, I)


def image_text_retrieval_metrics(
    similarity,
    text_to_image,
    ks: Sequence[int] = DEFAULT_KS,
    texts: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Both directions from an image-by-text similarity matrix.

    Args:
        similarity: (I, T) image-to-text scores.
        text_to_image: (T,) index of the image each text belongs to; an image may own several texts. Images that
            own none are text→image candidates only.
        ks: recall cut-offs.
        texts: the T captions; when given, the duplicate-aware variants "i2t_dedup" and "t2i_dedup" are added.

    Returns:
        {"i2t": {"R@1", ..., "mean_rank", "median_rank"}, "t2i": {...}} (+ "i2t_dedup", "t2i_dedup").
    """
    sim = _as_matrix("similarity", similarity)  # (I, T)
    num_images, num_texts = sim.shape
    owns = _positives_from_assignment(text_to_image, num_images)  # (T, I)
    if owns.shape[0] != num_texts:
        raise ValueError(f"similarity has {num_texts} text columns but text_to_image has {owns.shape[0]} entries.")
    # Images that own no caption (e.g. composed-retrieval targets) are candidates for text→image but cannot be
    # image→text queries.
    captioned = owns.any(dim=0)  # (I,)
    if not captioned.any():
        raise ValueError("No image owns a text; image-text retrieval needs at least one caption.")
    # Row selection copies; skip it in the usual case where every image has captions (COCO: 500 MB saved).
    queries = slice(None) if bool(captioned.all()) else captioned
    out = {
        "i2t": recall_from_ranks(ranks_from_similarity(sim[queries], owns.T[queries]), ks),
        "t2i": recall_from_ranks(ranks_from_similarity(sim.T, owns), ks),
    }
    if texts is not None:
        dup = duplicate_positives(text_to_image, texts, num_images)  # (T, I)
        out["i2t_dedup"] = recall_from_ranks(ranks_from_similarity(sim[queries], dup.T[queries]), ks)
        out["t2i_dedup"] = recall_from_ranks(ranks_from_similarity(sim.T, dup), ks)
    return out


def retrieval_metrics(
    image_embeddings,
    text_embeddings,
    text_to_image,
    ks: Sequence[int] = DEFAULT_KS,
    texts: Sequence[str] | None = None,
    normalize: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`image_text_retrieval_metrics` from embeddings: (I, D) images and (T, D) texts, cosine similarity."""
    return image_text_retrieval_metrics(cosine_similarity_matrix(image_embeddings, text_embeddings, normalize),
                                        text_to_image, ks, texts)


def composed_retrieval_metrics(
    query_embeddings,
    image_embeddings,
    target_index,
    reference_index=None,
    ks: Sequence[int] = DEFAULT_KS,
    normalize: bool = True,
) -> dict[str, float]:
    """Composed image retrieval: (reference image + modification text) query -> target image.

    Args:
        query_embeddings: (Q, D) embeddings of the composed queries.
        image_embeddings: (I, D) candidate images.
        target_index: (Q,) index of each query's target among the candidates.
        reference_index: (Q,) index of each query's reference image; it is removed from that query's candidates
            (returning the input image is trivial and says nothing). None when references are not candidates.

    Returns:
        {"R@k": ..., "mean_rank", "median_rank"}.
    """
    sim = cosine_similarity_matrix(query_embeddings, image_embeddings, normalize)  # (Q, I)
    num_queries, num_images = sim.shape
    target = torch.as_tensor(target_index, dtype=torch.long)
    if target.shape != (num_queries,):
        raise ValueError(f"target_index must have one entry per query ({num_queries}), got shape "
                         f"{tuple(target.shape)}.")
    positives = _positives_from_assignment(target, num_images)  # (Q, I)
    exclude = None
    if reference_index is not None:
        reference = torch.as_tensor(reference_index, dtype=torch.long)
        if reference.shape != (num_queries,):
            raise ValueError(f"reference_index must have one entry per query ({num_queries}), got shape "
                             f"{tuple(reference.shape)}.")
        same = (reference == target).nonzero().flatten()
        if len(same):
            raise ValueError(f"Composed queries {same[:10].tolist()} have the reference image as their target; "
                             "excluding the reference would leave them unanswerable.")
        exclude = _positives_from_assignment(reference, num_images)
    return recall_from_ranks(ranks_from_similarity(sim, positives, exclude), ks)


def modality_gap(image_embeddings, text_embeddings) -> float:
    """||mean(normalised images) - mean(normalised texts)||: the distance between the two modality centroids.

    (Liang et al. 2022, "Mind the Gap".) 0 when both modalities occupy the same region; up to 2 on the unit sphere.
    """
    img = torch.nn.functional.normalize(_as_matrix("image_embeddings", image_embeddings).double(), dim=-1)
    txt = torch.nn.functional.normalize(_as_matrix("text_embeddings", text_embeddings).double(), dim=-1)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image embeddings are {img.shape[1]}-dimensional but text embeddings are {txt.shape[1]}.")
    if not len(img) or not len(txt):
        raise ValueError("modality_gap needs at least one image and one text embedding.")
    return (img.mean(0) - txt.mean(0)).norm().item()
