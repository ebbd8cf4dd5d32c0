"""Second-stage reranking with the frozen backbone itself: score (query, candidate) pairs with the MLLM's own head.

SLQ never changes the backbone, so the model that embeds is still the full chat model. It can retrieve the top k with
the embedding, rerank them here with the same weights, and answer with ``generate``: one loaded model.

Scorers (one row each in ``SCORERS``):

- ``likelihood``: mean log-probability of the text's tokens (plus the end-of-turn token) as the assistant's answer
  to a user turn holding the image (the generative-likelihood score of VisualGPTScore). Works in both directions:
  a text query over image candidates, an image query over text candidates. Any captioning backbone can do it.
- ``yes_no``: ``logit(yes) - logit(no)`` at the answer slot after a user turn holding the image and a question asking
  whether it matches the text (Qwen3-VL-Reranker style). Needs an instruction-following backbone; question and
  answer words are configurable (``YesNoPrompt``), with defaults per family in ``YES_NO_DEFAULTS``.

Cost: when the query holds the image (an image query over k texts), every pair starts with the same tokens (chat
template + image [+ the question's head]). That common prefix runs once with a KV cache; each batch of candidates
then runs only its own tokens against a batch-expanded view of that cache. Equal to k full forwards (<= 1e-5 fp32).

Ships inside every checkpoint (remote code): torch/transformers/PIL/tqdm + siblings only.
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .backbones import backbone_spec
from .control_tokens import literal_tokenizer
from .positions import query_position_ids, sequence_position_ids
from .prefix_cache import cache_kwarg
from .processing_slq import SLQInput, SLQInputError, SLQItem, collate, image_budget, prompt_length_limit, to_item

# Sentinel answer used once per processor to read how its chat template wraps an assistant turn.
_SENTINEL = "ZQXSENTINELQXZ"
# Config attributes naming the image/video placeholder token; a shared prefix must hold all of them.
_VISION_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass(frozen=True)
class YesNoPrompt:
    """The ``yes_no`` scorer's question and answer words.

    Attributes:
        question: user-turn text after the image; ``{text}`` is replaced by the text side of the pair. Keep
            ``{text}`` near the end: everything before it is shared by all candidates of an image query.
        yes / no: answer words; each is scored by the logit of its FIRST token at the answer slot, tokenised as the
            chat template writes an answer (" Yes" after SmolVLM's "Assistant:", see :func:`answer_template`).
    """

    question: str = 'Does the image match the text "{text}"? Answer with yes or no.'
    yes: str = "yes"
    no: str = "no"

    def __post_init__(self) -> None:
        if "{text}" not in self.question:
            raise ValueError(f"YesNoPrompt.question={self.question!r} has no '{{text}}' field; the text of each pair "
                             "must go into the question.")
        if not self.yes.strip() or not self.no.strip() or self.yes == self.no:
            raise ValueError(f"YesNoPrompt answer words must be two different non-empty words, got yes={self.yes!r}, "
                             f"no={self.no!r}.")


# Qwen3-VL-Reranker's convention (lower-case words, asked for explicitly) for the Qwen-VL families; the LLaVA-style
# evaluation prompt ("Answer the question using a single word or phrase.", answers "Yes"/"No") for the others.
_QWEN_YES_NO = YesNoPrompt()
_LLAVA_YES_NO = YesNoPrompt('Does the image match the text "{text}"? Answer the question using a single word or '
                            'phrase.', yes="Yes", no="No")
YES_NO_DEFAULTS: dict[str, YesNoPrompt] = {
    "qwen2_vl": _QWEN_YES_NO,
    "qwen2_5_vl": _QWEN_YES_NO,
    "qwen3_vl": _QWEN_YES_NO,
    "internvl": _LLAVA_YES_NO,
    "llava": _LLAVA_YES_NO,
    "llava_next": _LLAVA_YES_NO,
    "llava_onevision": _LLAVA_YES_NO,
    "idefics3": _LLAVA_YES_NO,
    "smolvlm": _LLAVA_YES_NO,
    "gemma3": _LLAVA_YES_NO,
}


@dataclass
class RerankResult:
    """Output of :func:`rerank`.

    Attributes:
        scores: (N,) float32 score of every candidate, in the candidates' order (higher = better match).
        order: (K,) long candidate indices, best first; K = ``top_k`` or N. Ties keep the input order.
        rewritten: with ``rewrite=``, the backbone's rewrite of each pair's text (what was scored).
    """

    scores: torch.Tensor
    order: torch.Tensor
    rewritten: list[str] | None = None  # with ``rewrite=``: the texts actually scored, in pair order


@dataclass
class _Pair:
    """One (image side, text side) pair as the backbone sees it."""

    image: SLQItem  # holds the image (and optionally its own text, placed after the image)
    text: str
    source: str  # "candidate 3", named in errors


@dataclass
class _Row:
    """One tokenised pair: the full sequence of real tokens and what to read from it."""

    ids: torch.Tensor  # (n,) long
    extras: dict[str, torch.Tensor]  # per-token processor outputs (mm_token_type_ids, ...), each (n,)
    start: int  # first answer token (likelihood); n for yes_no (the logit at n - 1 is read)


# ------------------------------------------------------------------------------------------------- scorers
def _likelihood_window(rows: list[_Row]) -> list[tuple[int, int]]:
    # Logits at positions start-1 .. n-2 predict the answer tokens start .. n-1.
    return [(row.start - 1, row.ids.shape[0] - 1) for row in rows]


def _yes_no_window(rows: list[_Row]) -> list[tuple[int, int]]:
    return [(row.ids.shape[0] - 1, row.ids.shape[0]) for row in rows]


@dataclass(frozen=True)
class _Scorer:
    """Which logits a scorer reads and how it turns them into one score per pair."""

    window: Callable[[list[_Row]], list[tuple[int, int]]]  # per row: [first, stop) positions whose logits are read
    reduce: Callable[[torch.Tensor, _Row, dict[str, Any]], float]  # (window, V) float32 logits -> score


def _likelihood_score(logits: torch.Tensor, row: _Row, settings: dict[str, Any]) -> float:
    targets = row.ids[row.start:].to(logits.device)  # (A,)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (A,)
    return logprobs.mean().item()


def _yes_no_score(logits: torch.Tensor, row: _Row, settings: dict[str, Any]) -> float:
    yes, no = settings["answer_ids"]
    return (logits[-1, yes] - logits[-1, no]).item()


SCORERS: dict[str, _Scorer] = {
    "likelihood": _Scorer(_likelihood_window, _likelihood_score),
    "yes_no": _Scorer(_yes_no_window, _yes_no_score),
}


# ------------------------------------------------------------------------------------------- tokenisation
def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _special_strings(tokenizer: Any) -> list[str]:
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def answer_template(processor: Any) -> tuple[str, int | None]:
    """How the processor's chat template writes an assistant answer after the generation prompt.

    Returns:
        (lead, end_id): ``lead`` is the text the template puts between the generation prompt and the answer (" " for
        "ASSISTANT: ...", "" for ChatML); ``end_id`` is the first token of what follows the answer (the end-of-turn
        token, e.g. ``<|im_end|>``), or None when the template closes the turn with whitespace only.
    """
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + answer, tokenize=False)
    prompt, full = (p[0] if isinstance(p, list) else p for p in (prompt, full))
    lead, tail = _answer_lead(prompt, full)
    tail = tail.strip()
    end_id = None
    if tail:
        ids = _tokenizer(processor)(tail, add_special_tokens=False)["input_ids"]
        end_id = int(ids[0]) if ids else None
    return lead, end_id


def _answer_lead(prompt: str, full: str) -> tuple[str, str]:
    """(lead, tail): what the rendered answer turn ``full`` puts between the generation ``prompt`` and the sentinel
    answer, and what follows it.

    Some templates render an assistant turn's header with other whitespace than their generation prompt
    (LLaVA-OneVision: ``<|im_start|>assistant \\n`` vs ``<|im_start|>assistant\\n``). The model answers after the
    generation prompt, so when the two differ only in whitespace the answer follows that prompt directly (lead "").
    """
    head, found, tail = full.partition(_SENTINEL)
    if found and head.startswith(prompt):
        return head[len(prompt):], tail
    common = len(os.path.commonprefix([prompt, head]))
    if found and not prompt[common:].strip() and not head[common:].strip():
        return "", tail
    raise ValueError("The backbone's chat template does not write an assistant answer right after its generation "
                     "prompt, so the likelihood scorer cannot tell where the answer starts.")


def answer_ids(processor: Any, text: str, lead: str = "", end_id: int | None = None) -> list[int]:
    """Token ids of ``text`` as the assistant's answer: ``lead`` + text, then ``end_id`` when given.

    Control tokens inside ``text`` (``<|im_end|>``, ...) are tokenised as the literal text they are.
    """
    tokenizer, literal = _tokenizer(processor), literal_tokenizer(processor)
    if any(s in lead for s in _special_strings(tokenizer)):
        ids = list(tokenizer(lead, add_special_tokens=False)["input_ids"])
        ids += literal(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    else:  # lead and text together: byte-level BPE writes " a" as one token after "ASSISTANT:"
        ids = list(literal(lead + text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return ids + ([end_id] if end_id is not None else [])


def yes_no_ids(processor: Any, prompt: YesNoPrompt, lead: str = "") -> tuple[int, int]:
    """(yes id, no id): the first token of each answer word written after the template's ``lead`` (byte-level BPE
    has both "Yes" and " Yes"; after "Assistant:" the model says the latter); ValueError if the vocabulary lacks them.
    """
    unk = getattr(_tokenizer(processor), "unk_token_id", None)
    out = []
    for word in (prompt.yes, prompt.no):
        ids = answer_ids(processor, word, lead)
        if not ids or (unk is not None and ids[0] == unk):
            raise ValueError(f"The yes_no scorer's answer word {word!r} is not in this backbone's vocabulary (it "
                             "tokenises to the unknown token); pass yes_no=YesNoPrompt(yes=..., no=...) with words "
                             "the backbone knows, or use scorer='likelihood'.")
        out.append(int(ids[0]))
    if out[0] == out[1]:
        raise ValueError(f"The answer words {prompt.yes!r} and {prompt.no!r} start with the same token (written "
                         f"after {lead!r}, as this chat template writes an answer); pick words whose first tokens "
                         "differ.")
    return out[0], out[1]


def _prompt_item(pair: _Pair, scorer: str, yes_no: YesNoPrompt) -> SLQItem:
    if scorer == "likelihood":
        return pair.image
    question = yes_no.question.replace("{text}", pair.text)
    text = question if pair.image.text is None else f"{pair.image.text}\n{question}"
    return replace(pair.image, text=text)


def _token_keys(model_type: str) -> tuple[str, ...]:
    return backbone_spec(model_type).token_keys


def _rows(batch: Any, answers: list[list[int]], token_keys: Sequence[str]) -> list[_Row]:
    """Real tokens of each processed prompt (padding dropped, either side) + its answer ids."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    rows = []
    for i, answer in enumerate(answers):
        keep = mask[i].bool() if mask is not None else torch.ones_like(ids[i], dtype=torch.bool)
        prompt = ids[i][keep]
        extras = {}
        for key in token_keys:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                extras[key] = torch.cat([value[i][keep], value.new_zeros(len(answer))])  # answer tokens are text
        full = torch.cat([prompt, torch.tensor(answer, dtype=prompt.dtype)])
        rows.append(_Row(full, extras, prompt.shape[0]))
    return rows


def _check_lengths(pairs: Sequence[_Pair], rows: Sequence[_Row], limit: int | None) -> None:
    """Refuse a pair whose full sequence (prompt + answer) exceeds the backbone's positions, naming its candidate.

    Every path checks the rows it runs, however they were built (the shared prefix appends answers by hand).
    """
    for pair, row in zip(pairs, rows, strict=True):
        if limit is not None and row.ids.shape[0] > limit:
            raise SLQInputError(f"The pair with {pair.source} has {row.ids.shape[0]} tokens, more than the "
                                f"backbone's {limit} positions; shorten the text (or use a smaller image).")


def _pad(tensors: list[torch.Tensor], side: str, value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) padded stack of 1-D tensors and its (B, L) mask."""
    length = max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), length), value)
    mask = torch.zeros((len(tensors), length), dtype=torch.long)
    for i, t in enumerate(tensors):
        span = slice(length - t.shape[0], length) if side == "left" else slice(0, t.shape[0])
        out[i, span], mask[i, span] = t, 1
    return out, mask


# --------------------------------------------------------------------------------------------- the backbone
def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _expand_cache(cache: Any, batch: int) -> Any:
    """A batch-``batch`` view of a batch-1 cache, leaving ``cache`` itself untouched.

    Dynamic layers only ever concatenate onto their tensors, so expanded (zero-copy) views are safe to hand to the
    suffix pass; other cache types get a deep copy repeated along the batch.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    # Exact types: subclasses (quantized, indexed layers) may update their tensors in place.
    if layers is None or not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return _copy_cache(cache, batch)
    expanded = copy.copy(cache)
    expanded.layers = []
    for layer in layers:
        view = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            view.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            view.values = layer.values.expand(batch, *layer.values.shape[1:])
        expanded.layers.append(view)
    return expanded


def _copy_cache(cache: Any, batch: int) -> Any:
    """A deep copy of a batch-1 cache repeated ``batch`` times (any cache type; costs a copy per batch)."""
    expanded = copy.deepcopy(cache)
    expanded.batch_repeat_interleave(batch)
    return expanded


def _forward(backbone: torch.nn.Module, keep: int | None = None, **inputs) -> Any:
    if keep is not None and "logits_to_keep" in inspect.signature(backbone.forward).parameters:
        inputs["logits_to_keep"] = keep
    return backbone(**inputs, return_dict=True)


def _image_kwargs(batch: Any, token_keys: Sequence[str]) -> dict[str, Any]:
    """The processor outputs that are not per-token (pixel_values, image_grid_thw, ...)."""
    skip = {"input_ids", "attention_mask", *token_keys}
    return {k: v for k, v in batch.items() if k not in skip and v is not None}


def _positions(backbone, spec, inputs: dict[str, Any], image_inputs: dict[str, Any]) -> dict[str, Any]:
    """Explicit M-RoPE positions for a pass with images: left to itself, a Qwen-VL backbone would store this call's
    rope deltas on the shared model object, where a ``generate`` running in another thread reads them."""
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    positions = sequence_position_ids(backbone.base_model, spec, inputs["input_ids"], inputs["attention_mask"],
                                      {**extra, **image_inputs})
    return {} if positions is None else {"position_ids": positions}


def _score_full(backbone, spec, rows: list[_Row], image_inputs: dict[str, Any], scorer: _Scorer,
                settings: dict[str, Any], pad_id: int) -> list[float]:
    """k full forwards in one left-padded batch (the reference path, and the path for a text query)."""
    device = backbone.device
    ids, mask = _pad([r.ids for r in rows], "left", pad_id)  # (B, L)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    for key in rows[0].extras:
        inputs[key] = _pad([r.extras[key] for r in rows], "left")[0].to(device)
    inputs.update(_positions(backbone, spec, inputs, image_inputs))
    windows = scorer.window(rows)
    # With left padding every row ends at the last position: only the last `keep` positions' logits are needed.
    keep = max(r.ids.shape[0] - first for r, (first, _) in zip(rows, windows))
    logits = _forward(backbone, keep, **inputs, **image_inputs, use_cache=False).logits[:, -keep:].float()
    scores = []
    for i, (row, (first, stop)) in enumerate(zip(rows, windows)):
        offset = keep - row.ids.shape[0]  # position p of row i is logits[i, p + offset]
        scores.append(scorer.reduce(logits[i, first + offset : stop + offset], row, settings))
    return scores


def _common_prefix(rows: list[_Row], vision_ids: set[int], windows: list[tuple[int, int]]) -> int:
    """Length of the token prefix all rows share and that a cached pass may stop after: it must hold every vision
    token (the image inputs go with the prefix pass) and end at or before every row's first logit position + 1."""
    first = rows[0].ids
    length = min(min(r.ids.shape[0] for r in rows) - 1, min(start + 1 for start, _ in windows))
    for row in rows[1:]:
        same = (row.ids[:length] == first[:length]).long()
        length = int(same.cumprod(0).sum())
        if any(not torch.equal(row.extras[k][:length], rows[0].extras[k][:length]) for k in row.extras):
            return 0
    if not vision_ids:  # cannot tell where the image ends: no sharing
        return 0
    vision = torch.tensor(sorted(vision_ids), dtype=first.dtype)
    return 0 if any(bool(torch.isin(r.ids[length:], vision).any()) for r in rows) else length


class _SharedPrefix:
    """The common prefix of an image query's pairs, run once; batches of candidates continue from its cache."""

    def __init__(self, backbone, spec, rows: list[_Row], length: int, image_inputs: dict[str, Any]):
        self.backbone, self.length = backbone, length
        device = backbone.device
        self.ids = rows[0].ids[:length][None].to(device)  # (1, P)
        self.mask = torch.ones_like(self.ids)
        self.extras = {k: v[:length][None].to(device) for k, v in rows[0].extras.items()}
        self.key = cache_kwarg(type(backbone))
        inputs = {"input_ids": self.ids, "attention_mask": self.mask, **self.extras}
        out = _forward(backbone, 1, **inputs, **_positions(backbone, spec, inputs, image_inputs), **image_inputs,
                       use_cache=True)
        self.cache = _output_cache(out)
        if self.cache is None:
            raise RuntimeError(f"{type(backbone).__name__} returned no cache with use_cache=True; call rerank with "
                               "share_prefix=False.")
        self.last_logits = out.logits[:, -1].float()  # (1, V): predicts the token right after the prefix
        self.spec, self.image_inputs = spec, image_inputs

    def score(self, rows: list[_Row], scorer: _Scorer, settings: dict[str, Any], pad_id: int) -> list[float]:
        batch, device = len(rows), self.backbone.device
        suffix, suffix_mask = _pad([r.ids[self.length:] for r in rows], "right", pad_id)  # (B, S)
        offsets = torch.arange(suffix.shape[1], device=device)
        # The positions the backbone would give these tokens in a full forward (M-RoPE: after the image's delta).
        positions = query_position_ids(self.backbone.base_model, self.spec, self.ids, self.mask,
                                       {**self.extras, **self.image_inputs}, offsets=offsets)
        positions = positions.expand(*positions.shape[:-2], batch, -1)  # (B, S) or (3, B, S)
        mask = torch.cat([self.mask.expand(batch, -1), suffix_mask.to(device)], dim=1)  # (B, P + S)
        out = _forward(self.backbone, None, input_ids=suffix.to(device), attention_mask=mask, position_ids=positions,
                       use_cache=True, **{self.key: _expand_cache(self.cache, batch)})
        # Window logits at full positions P-1 .. P+S-1: the prefix's last position, then the suffix's.
        logits = torch.cat([self.last_logits.expand(batch, -1)[:, None], out.logits.float()], dim=1)
        start = self.length - 1
        return [scorer.reduce(logits[i, first - start : stop - start], row, settings)
                for i, (row, (first, stop)) in enumerate(zip(rows, scorer.window(rows)))]


# ------------------------------------------------------------------------------------------------- rewrite
def rewrite_texts(backbone, processor, texts: list[str], template: str, max_new_tokens: int = 32,
                  cache: dict[tuple[str, str], str] | None = None) -> list[str]:
    """The backbone's own greedy answer to ``template`` (``{text}`` = each text), e.g. a knowledge caption turned
    into the plain caption the backbone would write for the image. Empty answers keep the original text.

    ``cache`` (a dict) keeps rewrites across calls: an evaluation meets the same candidate texts many times.
    """
    if "{text}" not in template:
        raise ValueError(f"rewrite={template!r} has no '{{text}}' field for the text to rewrite.")
    cache = {} if cache is None else cache
    out = []
    for text in texts:
        key = (template, text)
        if key not in cache:
            item = SLQItem(text=template.replace("{text}", text), source="rewrite prompt")
            batch = collate(processor, [item], max_length=prompt_length_limit(backbone.config, processor))
            batch = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            tokens = backbone.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            answer = _tokenizer(processor).decode(tokens[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            cache[key] = answer.strip() or text
        out.append(cache[key])
    return out


# -------------------------------------------------------------------------------------------------- rerank
def _pairs(query: SLQItem, candidates: list[SLQItem]) -> tuple[list[_Pair], bool]:
    """Pairs (image side, text side) and whether the query is the image side."""
    if query.image is None and query.text is None:  # pragma: no cover - to_item refuses this
        raise SLQInputError("The query is empty.")
    query_has_image = query.image is not None
    pairs = []
    for index, candidate in enumerate(candidates):
        where = f"candidate {index}"
        if query_has_image:
            if candidate.image is not None or candidate.text is None:
                raise SLQInputError(f"The query holds an image, so every candidate must be a text; {where} is "
                                    f"{candidate.kind}. Rerank images with a text query.")
            pairs.append(_Pair(query, candidate.text, where))
        else:
            if candidate.image is None:
                raise SLQInputError(f"The query is a text, so every candidate must hold an image; {where} is a text. "
                                    "Text-to-text reranking is not supported.")
            pairs.append(_Pair(candidate, query.text, where))
    return pairs, query_has_image


def _positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    """``value`` as a plain int, refusing anything but a positive integer (or None with ``allow_none``).

    Integer-likes count (``np.int64(5)`` from numpy arithmetic, a 0-d integer tensor): ``operator.index`` accepts
    exactly what can index, so floats stay refused; bool is refused although it is an int.
    """
    if allow_none and value is None:
        return None
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive integer" +
                         (" or None." if allow_none else "."))
    return number


def _batches(count: int, batch_size: int, show: bool | None, desc: str) -> Iterator[range]:
    from tqdm.auto import tqdm

    starts = range(0, count, batch_size)
    show = len(starts) > 8 if show is None else show
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show):
        yield range(start, min(start + batch_size, count))


@torch.inference_mode()
def rerank(
    backbone: torch.nn.Module,
    processor: Any,
    query: SLQInput,
    candidates: Sequence[SLQInput],
    scorer: str = "likelihood",
    *,
    top_k: int | None = None,
    batch_size: int = 8,
    share_prefix: bool = True,
    prompt: str | None = None,
    yes_no: YesNoPrompt | None = None,
    end_of_turn: bool = True,
    rewrite: str | None = None,
    rewrite_cache: dict[tuple[str, str], str] | None = None,
    show_progress_bar: bool | None = None,
) -> RerankResult:
    """Score every (query, candidate) pair with the frozen backbone and sort the candidates.

    Args:
        backbone: the ``*ForConditionalGeneration`` model (``SLQModel.backbone``); it is only read.
        processor: its processor.
        query: a text, an image (PIL or path) or ``{"image", "text"}``; validated like ``SLQModel.encode``'s inputs.
        candidates: texts for an image query, images (or ``{"image", "text"}``) for a text query.
        scorer: ``"likelihood"`` or ``"yes_no"`` (see the module docstring).
        top_k: keep only the best ``top_k`` indices in ``order`` (scores are returned for all candidates).
        batch_size: pairs per forward pass.
        share_prefix: run the prefix common to all pairs once and reuse its KV cache (image queries); False runs one
            full forward per pair (the reference path, same scores).
        prompt: ``likelihood`` only: an instruction placed before the image in the user turn (default none: the
            image alone, as SLQ's own prompts and captioning training do).
        yes_no: ``yes_no`` only: question and answer words; default ``YES_NO_DEFAULTS`` for the backbone's family.
        end_of_turn: ``likelihood`` only: also score the end-of-turn token after the text, so a caption that stops
            half-way scores lower than a complete one.
        rewrite: a user-turn template with ``{text}``: the backbone first answers it for each pair's text (greedy)
            and its answer is scored instead. For queries that describe an image indirectly (knowledge captions:
            "the shape with three corners ..."), which the backbone would never write as a caption, the rewrite
            turns them into the caption it would write, and ``likelihood`` can then compare like with like.
        rewrite_cache: a dict reused across calls so the same text is rewritten once.
        show_progress_bar: None shows it for more than 8 batches.

    Returns:
        :class:`RerankResult` with ``scores`` (N,) in candidate order and ``order`` (top_k or N,) best first.

    Raises:
        SLQInputError: a malformed query or candidate (same messages as ``encode``), or a pair of two texts or two
            images.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} is unknown; choose one of {sorted(SCORERS)}.")
    batch_size = _positive_int("batch_size", batch_size)
    top_k = _positive_int("top_k", top_k, allow_none=True)
    ignored = {"likelihood": [("yes_no", yes_no is not None)],
               "yes_no": [("prompt", prompt is not None), ("end_of_turn", end_of_turn is not True)]}[scorer]
    if any(given for _, given in ignored):  # accepted and then ignored, the option would look as if it had an effect
        names = [name for name, given in ignored if given]
        raise ValueError(f"{', '.join(names)}= only applies to the other scorer, not scorer={scorer!r}; drop it or "
                         "choose that scorer.")
    if isinstance(candidates, (str, dict)) or not isinstance(candidates, Sequence):
        raise SLQInputError(f"candidates must be a list of inputs, got {type(candidates).__name__}; wrap a single "
                            "candidate in a list.")
    if processor is None:
        raise ValueError("Reranking needs the backbone's processor; pass processor=.")
    budget = image_budget(processor)
    query_item = to_item(query, None, budget)
    # Errors name "input i" exactly as encode does for the same list.
    items = [to_item(value, index, budget) for index, value in enumerate(candidates)]
    if not items:
        return RerankResult(torch.empty(0), torch.empty(0, dtype=torch.long))
    pairs, query_has_image = _pairs(query_item, items)
    rewritten = None
    if rewrite is not None:
        rewritten = rewrite_texts(backbone, processor, [p.text for p in pairs], rewrite, cache=rewrite_cache)
        pairs = [replace(p, text=t) for p, t in zip(pairs, rewritten)]
    model_type = backbone.config.model_type
    spec, token_keys = backbone_spec(model_type), _token_keys(model_type)
    settings: dict[str, Any] = {}
    yes_no = yes_no or YES_NO_DEFAULTS.get(model_type, _QWEN_YES_NO)
    lead, end_id = answer_template(processor)
    if scorer == "yes_no":
        settings["answer_ids"] = yes_no_ids(processor, yes_no, lead)
        answers = [[] for _ in pairs]
    else:
        answers = [answer_ids(processor, p.text, lead, end_id if end_of_turn else None) for p in pairs]
    tokenizer = _tokenizer(processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = prompt_length_limit(backbone.config, processor)
    instruction = prompt if scorer == "likelihood" else None
    impl = SCORERS[scorer]

    def tokenised(chunk: list[_Pair], answers_chunk: list[list[int]]) -> tuple[list[_Row], Any]:
        # No max_length: collate would cut a long text (and the yes_no question's tail) to fit; refuse it instead.
        batch = collate(processor, [_prompt_item(p, scorer, yes_no) for p in chunk], instruction)
        rows = _rows(batch, answers_chunk, token_keys)
        _check_lengths(chunk, rows, limit)
        return rows, batch

    scores = torch.empty(len(pairs), dtype=torch.float32)
    shared = None
    if share_prefix and query_has_image and len(pairs) > 1:
        shared = _shared_prefix(backbone, spec, pairs, answers, tokenised, token_keys, impl, limit)
    if shared is not None:
        prefix, rows = shared
        for span in _batches(len(pairs), batch_size, show_progress_bar, "rerank"):
            scores[list(span)] = torch.tensor(prefix.score([rows[i] for i in span], impl, settings, pad_id))
    else:
        # Similar lengths share a batch, so little of each batch is padding.
        order = sorted(range(len(pairs)), key=lambda i: (pairs[i].image.length_key(), len(answers[i])))
        for span in _batches(len(pairs), batch_size, show_progress_bar, "rerank"):
            index = [order[i] for i in span]
            rows, batch = tokenised([pairs[i] for i in index], [answers[i] for i in index])
            image_inputs = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v
                            for k, v in _image_kwargs(batch, token_keys).items()}
            scores[index] = torch.tensor(_score_full(backbone, spec, rows, image_inputs, impl, settings, pad_id))
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:  # a NaN would sort first, as the best candidate
        raise ValueError(f"The backbone scored the pair with {pairs[bad[0]].source} {scores[bad[0]].item()} "
                         f"({len(bad)} non-finite in all); check its weights and dtype (float16 overflows).")
    ranking = torch.sort(scores, descending=True, stable=True).indices
    return RerankResult(scores=scores, order=ranking[:top_k] if top_k is not None else ranking, rewritten=rewritten)


def _shared_prefix(backbone, spec, pairs, answers, tokenised, token_keys, impl,
                   limit: int | None) -> tuple[_SharedPrefix, list] | None:
    """Tokenise every pair of an image query and run their common prefix once; None when they share too little."""
    rows: list[_Row] = []
    if impl is SCORERS["likelihood"]:
        # One prompt for all pairs: process the image once and append each answer.
        base, first_batch = tokenised(pairs[:1], [[]])
        prompt = base[0]
        for answer in answers:
            ids = torch.cat([prompt.ids, torch.tensor(answer, dtype=prompt.ids.dtype)])
            extras = {k: torch.cat([v, v.new_zeros(len(answer))]) for k, v in prompt.extras.items()}
            rows.append(_Row(ids, extras, prompt.ids.shape[0]))
        _check_lengths(pairs, rows, limit)  # built by hand, past tokenised()'s check
    else:  # yes_no: the question differs per pair, so each prompt is processed (the processor is cheap)
        first_batch = tokenised(pairs[:1], answers[:1])[1]  # the image inputs of ONE copy of the image
        for span in range(0, len(pairs), 16):
            rows += tokenised(pairs[span : span + 16], answers[span : span + 16])[0]
    vision_ids = {v for a in _VISION_TOKEN_ATTRS if isinstance(v := getattr(backbone.config, a, None), int)}
    length = _common_prefix(rows, vision_ids, impl.window(rows))
    if length < 1:
        return None
    image_inputs = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v
                    for k, v in _image_kwargs(first_batch, token_keys).items()}
    return _SharedPrefix(backbone, spec, rows, length, image_inputs), rows
