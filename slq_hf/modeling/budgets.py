"""Image and text budgets: the resolution and length an SLQ model sees, part of the model (saved in config.json).

Queries are trained at one image resolution and text length and work best at the same, so the budget travels with
the queries and is applied to the backbone's processor in ONE place (:func:`processor_with_budgets`, called when an
``SLQModel`` is built). Every path that uses ``model.processor`` (encode, the training collator, evaluation, the
corpus index, the reranker) and the processor files ``save_pretrained`` writes (sentence-transformers loads them)
then see the same settings, and the processor's own resize rule decides every image size.

Budgets, in tokens of the language model (what a prompt costs):

- ``max_image_tokens`` / ``min_image_tokens``: image tokens after the vision merger. Applied through the image
  processor's own pixel rule (:data:`IMAGE_TOKEN_RULES`, one row per way processors size images); for families whose
  processor fixes the count (LLaVA, Gemma 3) or tiles (InternVL, Idefics3/SmolVLM, LLaVA-NeXT/OneVision) the image
  budget does not apply and stays None.
- ``max_text_tokens``: tokens of the user text (instruction and chat template not counted); longer texts are cut
  to their first ``max_text_tokens`` tokens, so the template's end of turn and generation prompt stay.

Ships inside every checkpoint (remote code): standard library and transformers only.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Retrieval defaults (Qwen3-VL-Embedding uses min_pixels 4,096 and max_pixels 1,843,200 on Qwen3-VL: 4 and 1,800
#: tokens of 32x32 pixels). ``"auto"`` in ``SLQModel.from_backbone`` means these, never above the backbone's own max
#: (and never a higher minimum than the backbone's own).
DEFAULT_MAX_IMAGE_TOKENS = 1800
DEFAULT_MIN_IMAGE_TOKENS = 4
DEFAULT_MAX_TEXT_TOKENS = 8192
AUTO = "auto"
BUDGET_FIELDS = ("max_image_tokens", "min_image_tokens", "max_text_tokens")
# Attribute on a budgeted processor copy holding the text budget. transformers' ProcessorMixin.to_dict saves only
# __init__ arguments, so it never reaches processor_config.json (config.json is where budgets are saved).
TEXT_BUDGET_ATTRIBUTE = "_slq_max_text_tokens"


def check_budget(name: str, value: Any, owner: str = "SLQConfig") -> None:
    """ValueError naming ``name``, ``value`` and what is allowed, unless ``value`` is None or a positive int."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}`={value!r} is invalid; expected a positive integer (tokens) or None "
                         "(the backbone processor's own setting / no limit).")


def check_budgets(max_image_tokens: Any, min_image_tokens: Any, max_text_tokens: Any, owner: str = "SLQConfig"
                  ) -> None:
    """Validate the three budgets together (each positive int or None, min <= max)."""
    for name, value in zip(BUDGET_FIELDS, (max_image_tokens, min_image_tokens, max_text_tokens), strict=True):
        check_budget(name, value, owner)
    if max_image_tokens is not None and min_image_tokens is not None and min_image_tokens > max_image_tokens:
        raise ValueError(f"{owner}: `min_image_tokens`={min_image_tokens} is larger than `max_image_tokens`="
                         f"{max_image_tokens}; the minimum must not exceed the maximum.")


@dataclass(frozen=True)
class PixelRule:
    """Processors that size an image to a pixel range on a grid of ``unit`` x ``unit`` pixel tokens (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL: ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``, ``smart_resize``)."""

    name: str = "pixels"

    @staticmethod
    def applies(image_processor: Any) -> bool:
        size = getattr(image_processor, "size", None)
        get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        return bool(getattr(image_processor, "temporal_patch_size", None)) and size is not None \
            and get("longest_edge") is not None and resize_function(image_processor) is not None

    @staticmethod
    def unit(image_processor: Any) -> int:
        return int(image_processor.patch_size) * int(image_processor.merge_size)

    @staticmethod
    def pixels(image_processor: Any) -> tuple[int, int]:
        """(min_pixels, max_pixels) the processor's resize uses: ``size``, overridden by ``min_pixels`` /
        ``max_pixels`` attributes when set (transformers 5 still passes those to every call, deprecated)."""
        size = image_processor.size
        get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        low, high = getattr(image_processor, "min_pixels", None), getattr(image_processor, "max_pixels", None)
        return int(low if low is not None else get("shortest_edge")), int(high if high is not None
                                                                           else get("longest_edge"))

    def own(self, image_processor: Any) -> tuple[int, int]:
        """(min_tokens, max_tokens) the processor allows now."""
        area = self.unit(image_processor) ** 2
        low, high = self.pixels(image_processor)
        return max(1, math.ceil(low / area)), high // area

    def apply(self, image_processor: Any, min_tokens: int, max_tokens: int) -> None:
        area = self.unit(image_processor) ** 2
        image_processor.size = {"shortest_edge": min_tokens * area, "longest_edge": max_tokens * area}
        for attribute in ("min_pixels", "max_pixels"):
            if getattr(image_processor, attribute, None) is not None:  # a hand-set override would win over size
                setattr(image_processor, attribute, None)

    def tokens(self, image_processor: Any, width: int, height: int) -> int:
        """Image tokens the processor makes of a ``width`` x ``height`` image (its own ``smart_resize``)."""
        unit = self.unit(image_processor)
        low, high = self.pixels(image_processor)
        h, w = resize_function(image_processor)(height, width, factor=unit, min_pixels=low, max_pixels=high)
        return (h // unit) * (w // unit)


#: One row per way image processors decide an image's token count; processors matching no row: budget n/a.
IMAGE_TOKEN_RULES: tuple[PixelRule, ...] = (PixelRule(),)


def resize_function(image_processor: Any) -> Callable[..., tuple[int, int]] | None:
    """The processor's OWN ``smart_resize(height, width, factor, min_pixels, max_pixels) -> (h, w)``: read from its
    module, so SLQ's sizes are the processor's exactly (forks with their own rounding included)."""
    module = sys.modules.get(type(image_processor).__module__)
    function = getattr(module, "smart_resize", None)
    return function if callable(function) else None


def image_rule(processor: Any) -> PixelRule | None:
    """The :data:`IMAGE_TOKEN_RULES` row of ``processor``'s image processor, or None (image budgets n/a)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    return next((rule for rule in IMAGE_TOKEN_RULES if rule.applies(image_processor)), None)


def resolve_image_budget(processor: Any, max_image_tokens: Any = AUTO, min_image_tokens: Any = AUTO
                         ) -> tuple[int | None, int | None]:
    """Concrete (max, min) image tokens for ``processor``: ``"auto"`` -> the retrieval defaults capped by the
    processor's own range, None -> the processor's own, an int -> itself. ValueError when an int is given for a
    processor without an image-token rule."""
    rule = image_rule(processor)
    if rule is None:
        given = {k: v for k, v in (("max_image_tokens", max_image_tokens), ("min_image_tokens", min_image_tokens))
                 if v not in (None, AUTO)}
        if given and processor is not None:
            kind = type(getattr(processor, "image_processor", processor)).__name__
            raise ValueError(f"{given} cannot apply to this backbone: its image processor ({kind}) fixes the number "
                             "of image tokens itself (fixed size or tiles). Leave the image budget at None/'auto'.")
        return None, None
    own_min, own_max = rule.own(processor.image_processor)
    maximum = min(DEFAULT_MAX_IMAGE_TOKENS, own_max) if max_image_tokens == AUTO else max_image_tokens
    minimum = min(DEFAULT_MIN_IMAGE_TOKENS, own_min) if min_image_tokens == AUTO else min_image_tokens
    if min_image_tokens == AUTO and maximum is not None and minimum is not None:
        minimum = min(minimum, maximum)  # a small explicit maximum lowers the automatic minimum with it
    check_budgets(maximum, minimum, None, owner="image budget")
    return maximum, minimum


def processor_with_budgets(processor: Any, max_image_tokens: int | None, min_image_tokens: int | None,
                           max_text_tokens: int | None) -> Any:
    """``processor`` with the budgets applied: a copy (the caller's object is never changed) whose image processor
    sizes images by the budget and that carries the text budget; ``processor`` itself when nothing changes.

    None keeps the processor's own image setting / no text limit. ValueError for an image budget on a processor
    whose image-token count the budget cannot set.
    """
    if processor is None:
        return None
    check_budgets(max_image_tokens, min_image_tokens, max_text_tokens, owner="budget")
    rule = image_rule(processor)
    if rule is None and (max_image_tokens is not None or min_image_tokens is not None):
        resolve_image_budget(processor, max_image_tokens, min_image_tokens)  # raises, naming the processor
    target_text = max_text_tokens
    if rule is not None:
        own_min, own_max = rule.own(processor.image_processor)
        new_min = own_min if min_image_tokens is None else min_image_tokens
        new_max = own_max if max_image_tokens is None else max_image_tokens
        if new_min > new_max:
            raise ValueError(f"budget: min_image_tokens={new_min} is larger than max_image_tokens={new_max}.")
        image_changes = (new_min, new_max) != (own_min, own_max)
    else:
        image_changes = False
    if not image_changes and getattr(processor, TEXT_BUDGET_ATTRIBUTE, None) == target_text:
        return processor
    budgeted = copy.copy(processor)
    if image_changes:
        image_processor = copy.deepcopy(processor.image_processor)
        rule.apply(image_processor, new_min, new_max)
        budgeted.image_processor = image_processor
    setattr(budgeted, TEXT_BUDGET_ATTRIBUTE, target_text)
    return budgeted


def with_overrides(processor: Any, config: Any, **overrides: int | None) -> Any:
    """``processor`` (already budgeted by the model's ``config``) with per-call budgets (``encode(...,
    max_image_tokens=...)``). ``max_text_tokens=None`` means no text limit, as in ``from_pretrained``; an image
    budget of None is refused (the backbone's own setting is chosen when loading)."""
    unknown = set(overrides) - set(BUDGET_FIELDS)
    if unknown:
        raise TypeError(f"Unknown budget option(s) {sorted(unknown)}; budgets are {list(BUDGET_FIELDS)}.")
    for name in ("max_image_tokens", "min_image_tokens"):
        if name in overrides and overrides[name] is None and getattr(config, name, None) is not None:
            raise ValueError(f"encode: `{name}`=None cannot be applied per call (this model's processor is already "
                             f"budgeted); load the model with from_pretrained(..., {name}=None) for the backbone's "
                             "own setting, or pass a positive integer.")
    given = dict(overrides)
    if not given or processor is None:
        return processor
    budgets = {k: getattr(config, k, None) for k in BUDGET_FIELDS}
    if "max_text_tokens" not in given:
        budgets["max_text_tokens"] = text_budget(processor)
    return processor_with_budgets(processor, **{**budgets, **given})


def text_budget(processor: Any) -> int | None:
    """The text budget a processor copy from :func:`processor_with_budgets` carries (None: no limit)."""
    return getattr(processor, TEXT_BUDGET_ATTRIBUTE, None)


def image_tokens(processor: Any, width: int, height: int) -> int | None:
    """Image tokens ``processor`` makes of a ``width`` x ``height`` image by its own rule; None without a rule."""
    rule = image_rule(processor)
    if rule is None:
        return None
    try:
        return rule.tokens(processor.image_processor, width, height)
    except ValueError:  # e.g. aspect ratio above 200: the processor refuses it with its own message later
        return None


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A UserWarning the first time ``key`` is seen in this process (over-budget inputs are often whole corpora)."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=4)
