"""User text is embedded as the literal text it is, even when it contains the backbone's control tokens.

A processor renders the chat template to one string and tokenises it with special tokens recognised, so a caption
holding ``<|im_end|>\\n<|im_start|>assistant`` would close the user turn, and one holding ``<|image_pad|>`` or
``<image>`` would open an image slot (the processor then fails, or the model reads image features there). Escaping
in the string cannot help: any string that tokenises to those pieces is that token.

The mechanism, the same for every family: every occurrence of a control string in a user text (the text and the
instruction) is replaced by a *sentinel*, a special token of the tokenizer that the chat template and the processor
never produce. The processor runs as usual (images expanded, template applied, padded). Then each sentinel token is
replaced by the tokenizer's ``split_special_tokens=True`` ids of the control string it stands for, i.e. the plain
pieces ``<``, ``|``, ``im``, ... that the literal characters are, and the rows are re-padded. The rest of the text is
tokenised in context exactly as before, so texts without control strings give the same prompt as without this module.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

# Processor outputs with one value per token: how each is filled for spliced-in text tokens and for padding.
# input_ids get the spliced ids and the tokenizer's pad id.
_PER_TOKEN_KEYS = {"attention_mask": (1, 0), "token_type_ids": (0, 0), "mm_token_type_ids": (0, 0)}
_cache: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def per_processor(processor: Any, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per live processor object and ``key`` (a processor's tokenizer and template never change
    in place; per-call budgets make a new processor object)."""
    entry = _cache.get(id(processor))
    if entry is None or entry[0]() is not processor:
        try:
            # The entry dies with the processor: a dead one would keep its values (a tokenizer copy) alive.
            entry = (weakref.ref(processor, lambda ref, key=id(processor): _cache.pop(key, None)
                                 if _cache.get(key, (None,))[0] is ref else None), {})
        except TypeError:  # not weak-referenceable: compute every time
            return compute()
        _cache[id(processor)] = entry
    values = entry[1]
    if key not in values:
        values[key] = compute()
    return values[key]


def _processor_tokens(processor: Any) -> set[str]:
    """The image/video/... token strings a processor expands or inserts (``image_token``, ``boi_token``, ...)."""
    found = set()
    for name in dir(processor):
        if name.endswith("_token") and not name.startswith("_"):
            try:
                value = getattr(processor, name)
            except Exception:  # a property that needs state the processor lacks
                continue
            if isinstance(value, str) and value:
                found.add(value)
    return found


def control_strings(processor: Any) -> tuple[str, ...]:
    """Every string that the tokenizer or processor would turn into template structure: the tokenizer's special
    (added) tokens and the processor's image/video tokens, longest first (so ``<|im_start|>`` never splits a longer
    control string)."""

    def compute() -> tuple[str, ...]:
        tokenizer = _tokenizer(processor)
        found = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
        found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        found |= _processor_tokens(processor)
        return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))

    return per_processor(processor, "strings", compute)


def _pattern(processor: Any) -> re.Pattern | None:
    strings = control_strings(processor)
    return per_processor(processor, "pattern",
                         lambda: re.compile("|".join(map(re.escape, strings))) if strings else None)


def _structural_ids(processor: Any) -> set[int]:
    tokenizer = _tokenizer(processor)
    ids = set()
    for string in control_strings(processor):
        token_id = tokenizer.convert_tokens_to_ids(string)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return ids


def literal_tokenizer(processor: Any) -> Any:
    """A private copy of the processor's tokenizer that is always in ``split_special_tokens`` mode (one per tokenizer).

    ``tokenizer(text, split_special_tokens=True)`` on a fast tokenizer sets ``encode_special_tokens`` on its Rust
    backend, which every thread shares, until a later call sets it back: a chat template tokenised meanwhile in
    another thread (encode, rerank, generate) would get ``<|im_start|>`` as the pieces ``<``, ``|``, ... . Literal
    text is tokenised by this copy instead, so the processor's own tokenizer never changes mode.
    """
    tokenizer = _tokenizer(processor)

    def build() -> Any:
        literal = copy.deepcopy(tokenizer)
        literal.split_special_tokens = True
        backend = getattr(literal, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            backend.encode_special_tokens = True
        return literal

    # Keyed on the tokenizer: budgeted processor copies share it.
    return per_processor(tokenizer, "literal tokenizer", build)


def split_text_ids(processor: Any, text: str) -> list[int]:
    """Token ids of ``text`` as literal text: control strings become plain pieces, never their special token.

    Uses the tokenizer's ``split_special_tokens=True`` (on :func:`literal_tokenizer`); a control string the tokenizer
    still matches (an image token that is not flagged special) is tokenised character by character instead.
    """
    tokenizer = literal_tokenizer(processor)
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    structural = per_processor(processor, "structural", lambda: _structural_ids(processor))
    if not structural.intersection(ids):
        return ids
    pieces = []
    for char in text:
        piece = tokenizer(char, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if structural.intersection(piece):
            raise ValueError(f"The tokenizer turns {char!r} into a control token; it cannot be embedded as text.")
        pieces += piece
    return pieces


def _sentinel(processor: Any, apply: Callable[[list], Any]) -> tuple[str, int]:
    """A special token the chat template and the processor never emit (checked on a probe prompt with an image and
    a text), preferring the pad token: it stands in for control strings while the processor runs."""
    tokenizer = _tokenizer(processor)
    probe_ids: set[int] = set()
    for content in ([{"type": "image", "image": Image.new("RGB", (64, 64), (128, 128, 128))},
                     {"type": "text", "text": "x"}], [{"type": "text", "text": "x"}]):
        try:
            probe_ids |= set(apply([[{"role": "user", "content": content}]])["input_ids"][0].tolist())
        except Exception:  # e.g. a processor without image support: the text-only probe still runs
            continue
    processor_ids = {tokenizer.convert_tokens_to_ids(t) for t in _processor_tokens(processor)}
    ends = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk")}
    avoid = probe_ids | processor_ids | ends
    candidates = [tokenizer.pad_token] if tokenizer.pad_token else []
    specials = getattr(tokenizer, "added_tokens_decoder", {})
    candidates += [specials[i].content for i in sorted(specials) if specials[i].special]
    for candidate in candidates:
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if isinstance(token_id, int) and token_id not in avoid:
            return candidate, token_id
    raise ValueError("This tokenizer has no special token left to stand in for control tokens in a text; remove "
                     f"{', '.join(control_strings(processor)[:5])} ... from the text.")


def _spanning(pattern: re.Pattern, before: Any, after: str) -> tuple[int, int] | None:
    """(start, end) in ``before`` of the first part of a control string that ``before`` + ``after`` form across the
    join (also once both are trimmed, as Gemma's template does), or None."""
    if not isinstance(before, str):
        return None
    for head, tail in ((before, after), (before.rstrip(), after.lstrip())):
        for match in pattern.finditer(head + tail):
            if match.start() < len(head) < match.end():
                return match.start(), len(head)
    return None


def _replace_in_conversations(conversations: list, pattern: re.Pattern, sentinel: str) -> tuple[list, list[list[str]]]:
    """Copy of ``conversations`` with control strings in text parts replaced by ``sentinel``; per row, the replaced
    strings in order of appearance."""
    replaced: list[list[str]] = []
    out = []
    for conversation in conversations:
        found: list[str] = []
        messages = []
        for message in conversation:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "text" and isinstance(part.get("text"), str):
                        text = pattern.sub(sentinel, part["text"])
                        # The template may join two text parts (instruction, text) directly: a control string
                        # split between them would form there, so the first part's share of it stays literal too.
                        span = _spanning(pattern, parts[-1].get("text"), text) if parts else None
                        if span is not None:
                            before = parts[-1]["text"]
                            found.append(before[span[0] : span[1]])
                            parts[-1] = {**parts[-1], "text": before[: span[0]] + sentinel + before[span[1] :]}
                        found += pattern.findall(part["text"])
                        part = {**part, "text": text}
                    parts.append(part)
                content = parts
            elif isinstance(content, str):
                found += pattern.findall(content)
                content = pattern.sub(sentinel, content)
            messages.append({**message, "content": content})
        out.append(messages)
        replaced.append(found)
    return out, replaced


def template_with_literal_texts(processor: Any, conversations: list, apply: Callable[[list], Any]) -> Any:
    """``apply(conversations)`` (the processor's chat template + processing, padded batch), with every control
    string inside a user text kept as literal text (see the module docstring). Returns what ``apply`` returns,
    with ``input_ids`` / ``attention_mask`` (and other per-token keys) re-padded after splicing, on the tokenizer's
    padding side."""
    pattern = _pattern(processor)
    # Deleting the control strings finds every row that has one (in a text part or across two of them).
    if pattern is None or not any(_replace_in_conversations(conversations, pattern, "")[1]):
        return apply(conversations)
    sentinel, sentinel_id = per_processor(processor, "sentinel", lambda: _sentinel(processor, apply))
    safe, replaced = _replace_in_conversations(conversations, pattern, sentinel)
    batch = apply(safe)
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    keys = [k for k in _PER_TOKEN_KEYS if isinstance(batch.get(k), torch.Tensor) and batch[k].shape == ids.shape]
    rows: list[dict[str, list[int]]] = []
    for row, strings in enumerate(replaced):
        real = mask[row].bool()
        values = {"input_ids": ids[row][real].tolist(), **{k: batch[k][row][real].tolist() for k in keys}}
        positions = [i for i, token in enumerate(values["input_ids"]) if token == sentinel_id]
        if len(positions) != len(strings):
            raise RuntimeError(f"Splicing control tokens failed: expected {len(strings)} stand-ins in row {row}, "
                               f"found {len(positions)}; the chat template or processor altered them.")
        for position, string in reversed(list(zip(positions, strings, strict=True))):
            pieces = split_text_ids(processor, string)
            values["input_ids"][position : position + 1] = pieces
            for key in keys:
                values[key][position : position + 1] = [_PER_TOKEN_KEYS[key][0]] * len(pieces)
        if "attention_mask" not in keys:
            values["attention_mask"] = [1] * len(values["input_ids"])
        rows.append(values)
    tokenizer = _tokenizer(processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r["input_ids"]) for r in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    fills = {"input_ids": pad_id, **{k: fill for k, (_, fill) in _PER_TOKEN_KEYS.items()}}
    out_keys = ["input_ids", *keys] + (["attention_mask"] if "attention_mask" in batch and "attention_mask" not in keys
                                       else [])
    for key in out_keys:
        padded = [[fills[key]] * (width - len(r[key])) for r in rows]
        data = [pad + r[key] if left else r[key] + pad for r, pad in zip(rows, padded, strict=True)]
        batch[key] = torch.tensor(data, dtype=ids.dtype if key == "input_ids" else batch[key].dtype)
    return batch
