"""Turning user inputs into backbone prompts: validation, lazy images, chat template, batching.

Lives in ``modeling/`` (and so ships with every checkpoint) because ``SLQModel.encode`` needs it even when the
model is loaded with ``trust_remote_code=True`` in an interpreter that never imported slq_hf. ``slq_hf.processing``
is the public import path for these helpers. Image files: :mod:`.image_files`; control tokens in user text:
:mod:`.control_tokens`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from .budgets import image_rule, image_tokens, text_budget, warn_once
from .checkpoint import position_budget
from .control_tokens import literal_tokenizer, per_processor, split_text_ids, template_with_literal_texts
from .image_files import (
    IMAGE_EXTENSIONS,
    ImageBudget,
    PendingImage,
    SLQInputError,
    decode_image,
    fit_image,
    image_budget,
    image_label,
    pending_image,
)

SLQInput = str | os.PathLike | Image.Image | dict
# Tokenizers without a real limit report transformers' VERY_LARGE_INTEGER (1e30) as model_max_length.
_NO_LIMIT = 10**12
# Errors a processor raises for an input it cannot handle (e.g. Qwen-VL: aspect ratio >= 200); they are re-raised
# as SLQInputError naming the input.
_PROCESSOR_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, OSError)
_SEPARATORS = tuple({"/", os.sep, os.altsep or "/"})


@dataclass
class SLQItem:
    """One normalised input: an image, a text, or both (image first, then text, in the user turn).

    ``image`` is an RGB PIL image once decoded, or a :class:`PendingImage` (header checked, pixels not decoded yet):
    ``to_items`` returns pending images and ``collate`` decodes them, so memory grows with the batch, not with the
    number of inputs.
    """

    image: Image.Image | PendingImage | None = None
    text: str | None = None
    # Where the item came from ("input 3, file 'cat.jpg'"), so errors raised later (collate) can name it.
    source: str | None = None

    @property
    def kind(self) -> str:
        if self.image is not None:
            return "image+text" if self.text is not None else "image"
        return "text"

    def length_key(self) -> tuple[int, int]:
        """Sort key that groups similar prompt lengths: modality first, then pixels, then characters."""
        order = {"text": 0, "image": 1, "image+text": 2}[self.kind]
        pixels = self.image.width * self.image.height if self.image is not None else 0
        return order, pixels + len(self.text or "")

    def decoded(self, budget: ImageBudget | None = None) -> SLQItem:
        """This item with its image decoded (RGB, EXIF-transposed, shrunk to ``budget``); itself when already so."""
        if isinstance(self.image, PendingImage):
            return replace(self, image=decode_image(self.image, budget))
        return self


def _where(index: int | None, path: Any = None) -> str:
    label = image_label(index, path)
    return f" ({label})" if label else ""


def _exists(text: str, file: bool = False) -> bool:
    # Texts are probed as paths: a 5000-character caption or one with a NUL byte must not raise here.
    try:
        path = Path(text).expanduser()
        return path.is_file() if file else path.exists()
    except (OSError, ValueError):
        return False


def looks_like_path(text: str) -> bool:
    """The rule that decides whether a ``str`` input is meant as a file path rather than a text.

    A one-line string (surrounding spaces ignored) is a path when it ends with an image extension (``cat.jpg``,
    ``my cat.jpg``, ``https://x/y.png``), or ends with a path separator (``photos/``), or has no whitespace, contains
    a separator and names something that exists (``data/photos``, ``./notes.txt``). A path-like string must name a
    readable image file (else SLQInputError); everything else is a text.
    """
    stripped = text.strip()
    if not stripped or "\n" in stripped:
        return False
    if stripped.lower().endswith(IMAGE_EXTENSIONS) or stripped.endswith(_SEPARATORS):
        return True
    return not any(c.isspace() for c in stripped) and any(s in stripped for s in _SEPARATORS) and _exists(stripped)


def _path_error(value: str, index: int | None) -> SLQInputError:
    stripped = value.strip()
    if stripped.startswith(("http://", "https://")):
        problem = "is a URL; slq_hf does not download images"
    elif _exists(stripped):
        problem = "is a folder" if Path(stripped).expanduser().is_dir() else "is not a regular file (a pipe or device)"
    else:
        problem = "looks like an image path but no such file exists"
    return SLQInputError(f"{value!r} {problem}{_where(index)}. A string that looks like a path is never embedded as "
                         "text: fix the path, or pass {'text': ...} to embed the string as text.")


def _check_text(text: Any, index: int | None) -> str:
    if not isinstance(text, str):
        raise SLQInputError(f"Expected text as str{_where(index)}, got {type(text).__name__}.")
    if not text.strip():
        raise SLQInputError(f"Text is empty or whitespace only{_where(index)}; an empty prompt has nothing to embed. "
                            "Remove the input or give it content.")
    return _valid_unicode(text, f"Text{_where(index)}")


def _valid_unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate (json.loads lets "\ud800" through): tokenizers refuse it
        raise SLQInputError(f"{what} is not valid Unicode: {err.reason} at character {err.start}. Fix the text "
                            "(e.g. decode it with errors='replace') or drop it.") from err
    return text


def to_item(value: SLQInput, index: int | None = None, budget: ImageBudget | None = None,
            lazy: bool = False) -> SLQItem:
    """Normalise one user input.

    Accepted: a text ``str``; a ``str``/``Path`` naming an image file; a PIL image; a dict with ``"image"`` and/or
    ``"text"``. A ``str`` is a path when :func:`looks_like_path` says so, and must then name a readable image (an
    existing image file is the image, spaces in its name allowed); anything else path-like (a folder, a missing
    file, a non-image file) is refused rather than silently embedded as text. ``{"text": ...}`` is always text.

    Images are checked from their header (allowed format, size limit for ``budget``). With ``lazy=False`` they are
    decoded right away (RGB, EXIF-transposed, shrunk to ``budget``); with ``lazy=True`` they stay
    :class:`PendingImage` until :func:`collate` (or :meth:`SLQItem.decoded`) decodes them.
    """
    image, text = None, None
    if isinstance(value, (Image.Image, os.PathLike)):
        image = value
    elif isinstance(value, str) and looks_like_path(value):
        if not _exists(value.strip(), file=True):
            raise _path_error(value, index)
        # An existing file is read as an image (even "my cat.jpg" with a space): refused if it is not one.
        image = value.strip()
    elif isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        unknown = set(value) - {"image", "text"}
        if unknown:
            raise SLQInputError(f"Unknown keys {sorted(unknown)}{_where(index)}; an input dict may hold 'image' and "
                                "'text'.")
        image, text = value.get("image"), value.get("text")
        if image is None and text is None:
            raise SLQInputError(f"Input dict has neither 'image' nor 'text'{_where(index)}.")
    elif value is None:
        raise SLQInputError(f"Input is None{_where(index)}; pass a text, an image, an image path or "
                            "{'image': ..., 'text': ...}, or drop it.")
    elif isinstance(value, (list, tuple)):
        raise SLQInputError(f"Nested {type(value).__name__}{_where(index)}: inputs must be a flat list. Flatten it, "
                            "or pass {'image': ..., 'text': ...} to embed an image and a text together.")
    else:
        hint = " Convert arrays/tensors with PIL.Image.fromarray first." if hasattr(value, "shape") else ""
        raise SLQInputError(f"Unsupported input type {type(value).__name__}{_where(index)}; pass a text, a PIL image, "
                            "an image path or {'image': ..., 'text': ...}." + hint)
    # One label names the item and its image: the input's index and, for an image given as a path, the file.
    label = image_label(index, image if isinstance(image, (str, os.PathLike)) else None)
    item = SLQItem(image=None if image is None else pending_image(image, label, budget),
                   text=None if text is None else _check_text(text, index), source=label)
    if item.image is not None and budget is not None and budget.unit and budget.target_size(*item.image.size):
        warn_once("image budget", f"Image of {item.image.width}x{item.image.height} pixels{_where(index)} is above "
                  f"the model's image budget ({budget.max_pixels:,} pixels); it is shrunk to the processor's grid "
                  "for that budget (shown once). Set max_image_tokens= (encode, from_backbone, from_pretrained) to "
                  "change the budget.")
    if item.image is not None and budget is not None and budget.unit and budget.resize is not None:
        width, height = budget.target_size(*item.image.size) or item.image.size  # what the processor will get
        try:  # its own size rule, now rather than when the batch is built (Qwen-VL: aspect ratio above 200)
            budget.resize(height, width, factor=budget.unit, min_pixels=budget.min_pixels or 1,
                          max_pixels=budget.max_pixels)
        except ValueError as err:
            raise SLQInputError(f"Image of {item.image.width}x{item.image.height} pixels{_where(index)} is refused by "
                                f"the backbone's processor ({err}); crop or pad it, or drop it.") from None
    return item if lazy else item.decoded(budget)


def to_items(inputs: SLQInput | list[SLQInput], budget: ImageBudget | None = None,
             lazy: bool = True) -> list[SLQItem]:
    """Normalise a single input or a list of inputs; errors name the offending index.

    Every input is checked now (types, texts, files exist and are allowed images of acceptable size, from their
    headers), so bad inputs fail before any work; with ``lazy=True`` (the default) images are decoded only when
    :func:`collate` builds their batch.
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image, dict)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise SLQInputError(f"Expected a list of inputs, got {type(inputs).__name__}.")
    return [to_item(value, index, budget, lazy=lazy) for index, value in enumerate(inputs)]


def build_messages(item: SLQItem, instruction: str | None = None) -> list[dict]:
    """The paper's prompt: one user turn holding the (optional) instruction, the image and the text."""
    content: list[dict] = []
    if instruction:
        content.append({"type": "text", "text": instruction})
    if item.image is not None:
        content.append({"type": "image", "image": item.image})
    if item.text is not None:
        content.append({"type": "text", "text": item.text})
    return [{"role": "user", "content": content}]


def prompt_length_limit(backbone_config: Any, tokenizer: Any = None, reserved: int = 0) -> int | None:
    """Longest prompt, in tokens, the backbone accepts when ``reserved`` more positions (the queries) follow it.

    The limit is the backbone's positions (``checkpoint.position_budget``) and the tokenizer's ``model_max_length``
    (ignored when it is transformers' "no limit" sentinel), whichever is smaller; None when neither is known.
    """
    value = getattr(getattr(tokenizer, "tokenizer", tokenizer), "model_max_length", None)
    tokens = value if isinstance(value, int) and 0 < value < _NO_LIMIT else None
    limits = [n for n in (position_budget(backbone_config), tokens) if n is not None]
    if not limits:
        return None
    limit = min(limits) - reserved
    if limit < 1:
        raise ValueError(f"The backbone accepts {min(limits)} positions, which leaves no room for a prompt before "
                         f"{reserved} queries; use fewer queries.")
    return limit


def _template(processor, items: list[SLQItem], instruction: str | None):
    def apply(conversations: list) -> Any:
        return processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )

    # Control tokens inside the user's text or instruction stay literal text, never template structure.
    return template_with_literal_texts(processor, [build_messages(item, instruction) for item in items], apply)


def _template_checked(processor, items: list[SLQItem], instruction: str | None):
    """``_template`` that turns a processor failure into an SLQInputError naming the item that caused it."""
    try:
        return _template(processor, items, instruction)
    except _PROCESSOR_ERRORS as err:
        culprit, cause = None, err
        if len(items) == 1:
            culprit = items[0]
        else:  # find the item the processor refuses on its own (rare path: only after a failure)
            for item in items:
                try:
                    _template(processor, [item], instruction)
                except _PROCESSOR_ERRORS as item_err:
                    culprit, cause = item, item_err
                    break
        if culprit is None:
            raise
        where = f" ({culprit.source})" if culprit.source else ""
        size = f" (image {culprit.image.width}x{culprit.image.height})" if culprit.image is not None else ""
        raise SLQInputError(f"The backbone's processor cannot handle this {culprit.kind} input{where}{size}: "
                            f"{type(cause).__name__}: {cause}. Fix the input (e.g. crop or pad an image with an "
                            "extreme aspect ratio) or drop it.") from cause


def _row_lengths(batch) -> list[int]:
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    return [int(n) for n in mask.sum(dim=1)]


def _truncate_text(processor, item: SLQItem, instruction: str | None, max_length: int, length: int) -> SLQItem:
    """Shorten the user text of ``item`` until its whole templated prompt fits ``max_length`` tokens.

    Truncating the text, not the token sequence, keeps the chat template's suffix (end of turn + generation prompt),
    so the queries still follow the generation prompt as in training.
    """
    where = f" ({item.source})" if item.source else ""
    if item.text is None:
        raise SLQInputError(f"The prompt of this image input{where} has {length} tokens, more than the {max_length} "
                            "the model accepts before its queries; use a smaller image or lower the processor's "
                            "max_pixels.")
    ids = split_text_ids(processor, item.text)  # literal-text ids: control tokens in the text are plain text
    keep, current = len(ids), length
    # Tokens at the cut may merge differently once re-tokenised in context, so re-measure and repeat if needed.
    for _ in range(8):
        keep -= max(1, current - max_length)
        if keep < 1:
            raise SLQInputError(f"The prompt{where} exceeds the model's limit of {max_length} tokens even without its "
                                "text (instruction, image and chat template alone are too long); shorten the "
                                "instruction or use a smaller image.")
        candidate = replace(item, text=_text_prefix(processor, item.text, ids, keep))
        current = _row_lengths(_template(processor, [candidate], instruction))[0]
        if current <= max_length:
            warnings.warn(f"Text{where} is too long: its prompt has {length} tokens, more than the model's limit of "
                          f"{max_length} (positions left for the prompt before the queries). Kept the first {keep} of "
                          f"{len(ids)} text tokens and the whole chat template; shorten the text to avoid this.",
                          UserWarning, stacklevel=3)
            return candidate
    raise SLQInputError(f"Could not truncate the text{where} to fit {max_length} tokens; shorten it.")


def _text_prefix(processor, text: str, ids: list[int], keep: int) -> str:
    """The start of ``text`` that its first ``keep`` tokens (``ids``, from :func:`split_text_ids`) cover, cut in the
    original string before the first dropped token: decoding the ids instead would split a multi-byte character
    into U+FFFD (byte-level BPE) or spell an unknown character as the unknown token's name."""
    tokenizer = literal_tokenizer(processor)
    try:
        offsets = tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer has no offsets
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        return text[: offsets[keep][0]] if keep < len(offsets) else text
    return tokenizer.decode(ids[:keep], skip_special_tokens=False)


def limit_text(processor, item: SLQItem, max_text_tokens: int | None) -> SLQItem:
    """``item`` with its user text cut to its first ``max_text_tokens`` tokens (literal text ids, so control tokens
    stay text), warning the first time; itself when it fits or there is no limit. Only the text is cut, so the chat
    template (end of turn, generation prompt) around it is kept, as in training."""
    if max_text_tokens is None or item.text is None or len(item.text.encode("utf-8")) < max_text_tokens:
        return item  # a token covers at least one byte (plus at most one prefix token): no tokenizer call needed
    ids = split_text_ids(processor, item.text)
    if len(ids) <= max_text_tokens:
        return item
    where = f" ({item.source})" if item.source else ""
    warn_once("text budget", f"Text{where} has {len(ids)} tokens, more than the model's text budget of "
              f"{max_text_tokens}; kept the first {max_text_tokens} (shown once). Set max_text_tokens= (encode, "
              "from_backbone, from_pretrained) to change the budget.")
    return replace(item, text=_text_prefix(processor, item.text, ids, max_text_tokens))


def estimate_tokens(processor, item: SLQItem, fixed_image_tokens: bool = False) -> int:
    """Tokens of ``item``'s own content, without decoding or templating it: text tokens (capped by the text budget)
    plus the image tokens the processor's own grid rule gives for the header size (the chat template around them:
    :func:`template_overhead`). With ``fixed_image_tokens`` (:func:`image_tokens_fixed`) an image counts 0: its
    tokens are part of the overhead. Images of other processors without a rule (tiles) count one token per 28x28
    pixels up to 4,096, so their batches can exceed ``max_batch_tokens`` somewhat."""
    total = 0
    if item.text is not None:
        budget = text_budget(processor)
        # A token is at least one character; texts longer than 4x the budget are certainly over it.
        length = len(split_text_ids(processor, item.text)) if budget is None or len(item.text) < 4 * budget \
            else budget
        total += length if budget is None else min(length, budget)
    if item.image is not None:
        tokens = image_tokens(processor, item.image.width, item.image.height)
        if tokens is None:
            tokens = 0 if fixed_image_tokens else min(item.image.width * item.image.height // 784, 4096)
        total += tokens
    return total


def image_tokens_fixed(processor) -> bool:
    """True when the processor, having no image-token rule, gives every image the same prompt length whatever its
    size (LLaVA, Gemma 3: a fixed count), as measured on two very different probe images."""
    if image_rule(processor) is not None:
        return False
    try:
        lengths = {_row_lengths(_template(processor, [SLQItem(image=Image.new("RGB", size, "white"))], None))[0]
                   for size in ((32, 32), (1024, 256))}
    except _PROCESSOR_ERRORS:
        return False
    return len(lengths) == 1


def template_overhead(processor, kinds: set[str], instruction: str | None = None,
                      fixed_image_tokens: bool = False) -> dict[str, int]:
    """Prompt tokens that are not the item's content (chat template, instruction, image markers; with
    ``fixed_image_tokens`` the image tokens too) per item kind, measured once on a minimal input of each kind; a kind
    the processor refuses counts 0."""
    overhead = {}
    for kind in kinds:
        probe = SLQItem(image=None if kind == "text" else Image.new("RGB", (32, 32), "white"),
                        text=None if kind == "image" else "x")
        try:
            length = _row_lengths(_template(processor, [probe], instruction))[0]
        except _PROCESSOR_ERRORS:
            continue
        overhead[kind] = max(0, length - estimate_tokens(processor, probe, fixed_image_tokens))
    return overhead


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Group item indices into batches: sorted by estimated length, at most ``batch_size`` items and, with
    ``max_batch_tokens``, at most that many PADDED tokens (rows x longest row) per batch; an item longer than the
    budget alone gets its own batch. Lists of indices into ``lengths``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:  # ascending: this item is the longest of its batch
        fits = len(current) < batch_size and (max_batch_tokens is None or lengths[index] * (len(current) + 1)
                                              <= max_batch_tokens)
        if current and not fits:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def encode_batches(processor, items: list[SLQItem], batch_size: int, max_batch_tokens: int | None = None,
                   instruction: str | None = None) -> list[list[int]]:
    """Batches of indices into ``items`` for encoding: similar estimated lengths together (:func:`estimate_tokens`,
    plus the chat template's :func:`template_overhead` when ``max_batch_tokens`` is given), at most ``batch_size``
    items and ``max_batch_tokens`` padded prompt tokens each (:func:`plan_batches`)."""
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if value is None and name == "max_batch_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer"
                             + (" or None (batches by count only)." if name == "max_batch_tokens" else "."))
    kinds = {item.kind for item in items}
    # A 1080p photo is not 2,600 tokens to LLaVA or Gemma 3: their images cost the same fixed count at any size.
    fixed = max_batch_tokens is not None and kinds != {"text"} and per_processor(
        processor, "fixed image tokens", lambda: image_tokens_fixed(processor))
    overhead = {} if max_batch_tokens is None else template_overhead(processor, kinds, instruction, fixed)
    return plan_batches([estimate_tokens(processor, item, fixed) + overhead.get(item.kind, 0) for item in items],
                        batch_size, max_batch_tokens)


def collate(processor, items: list[SLQItem], instruction: str | None = None, max_length: int | None = None):
    """Apply the backbone's chat template (generation prompt added) and its processor to a batch of items.

    Pending images (:func:`to_items`) are decoded here, one batch at a time; images larger than the processor's
    budget (:func:`image_budget`) are shrunk with PIL first. Control tokens in texts and in ``instruction`` are
    embedded as literal text (:mod:`.control_tokens`). User texts longer than the processor's text budget
    (``budgets.processor_with_budgets``) are cut to it (:func:`limit_text`). With
    ``max_length`` (see :func:`prompt_length_limit`), a prompt longer than that has its user text truncated, with a
    warning, so that the full templated prompt fits. A processor failure is raised as SLQInputError naming the item.

    Returns the processor's ``BatchFeature``: input_ids/attention_mask (B, L) plus image tensors; padding side is
    whatever the processor uses (SLQModel re-lays rows to left padding itself).
    """
    if not items:
        raise SLQInputError("Cannot collate an empty batch.")
    if instruction is not None and not isinstance(instruction, str):
        raise SLQInputError(f"instruction= must be a str (or None), got {type(instruction).__name__}.")
    if instruction is not None:
        _valid_unicode(instruction, "instruction=")
    budget = image_budget(processor)
    max_text_tokens = text_budget(processor)
    items = [limit_text(processor, item.decoded(budget), max_text_tokens) for item in items]
    items = [item if item.image is None else replace(item, image=fit_image(item.image, budget)) for item in items]
    batch = _template_checked(processor, items, instruction)
    if max_length is not None:
        lengths = _row_lengths(batch)
        if max(lengths) > max_length:
            for position, length in enumerate(lengths):  # a loop, not a comprehension: keeps warning stacklevels
                if length > max_length:
                    items[position] = _truncate_text(processor, items[position], instruction, max_length, length)
            batch = _template_checked(processor, items, instruction)
    return batch
