"""KARR-style knowledge retrieval sets written by the backbone itself (``slq-hf karr-build``).

KARR-Bench (the SLQ paper's knowledge-aware retrieval benchmark) describes every image only through world knowledge
("a grey cat on a bookshelf" -> "the animal with (2+7) lives sitting on a bookshelf"). The SAME frozen backbone an
SLQ model runs on rewrites each image's first caption with its greedy ``generate()`` and a few-shot prompt;
rewrites that still name the object are skipped and counted; the result is in the KARR layout. Quality depends
entirely on the backbone: a real MLLM writes good knowledge captions, a tiny test backbone only tests the plumbing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..modeling.checkpoint import atomic_write
from .readers import read_records
from .records import DataFormatError, check_distinct_files, image_key

# The prompt the backbone answers, as the text of one user turn of its chat template (generation prompt added).
# {caption} is the explicit caption, {object} the word(s) the rewrite must not use. Two few-shot examples (the
# paper's) show the target style: name the object only through facts, keep the rest of the scene.
DEFAULT_TEMPLATE = (
    "Rewrite the image caption so that it describes the same image through world knowledge and reasoning instead "
    "of naming the main object. Keep everything else in the scene. Never use the word \"{object}\".\n"
    "Caption: a grey cat on a bookshelf\n"
    "Rewrite: the animal with (2+7) lives sitting on a bookshelf\n"
    "Caption: a carrot stick\n"
    "Rewrite: a long, orange root vegetable commonly used in salads and soups\n"
    "Caption: {caption}\n"
    "Rewrite:"
)

# Words that end the first noun phrase of a caption ("a grey cat | on a bookshelf"): its last word before them is
# taken as the object when the line names none.
_PHRASE_ENDS = frozenset(
    "on in at with next near under over by of from behind beside above below inside outside into onto through "
    "and or while that which who is are was were has have sitting standing lying holding eating playing looking "
    "walking running flying parked hanging".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")

@dataclass
class PairImage:
    """One image of the pairs file with its captions and the words its rewrite must not contain."""

    image: Path
    captions: list[str]
    objects: list[str]
    split: str | None = None
    id: str | None = None


@dataclass
class KarrBuildStats:
    """What happened to every image: kept, or skipped because the rewrite leaked an object word or was empty."""

    written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"image", "caption", "rewrite", "reason"}

    skipped_leak = property(lambda self: sum(s["reason"] != "empty" for s in self.skipped))
    skipped_empty = property(lambda self: len(self.skipped) - self.skipped_leak)
    total = property(lambda self: self.written + len(self.skipped))


# ------------------------------------------------------------------------------------------------------- text
def object_words(caption: str) -> list[str]:
    """The object of an explicit caption by a simple rule: the last word of its first noun phrase.

    "a grey cat on a bookshelf" -> ["cat"]; "a red triangle in the top left" -> ["triangle"].
    """
    phrase = []
    for word in _WORD.findall(caption.lower()):
        if word in _PHRASE_ENDS and phrase:
            break
        phrase.append(word)
    return phrase[-1:]


def leaked_words(text: str, objects: Sequence[str]) -> list[str]:
    """Object words that ``text`` contains as whole words (case-insensitive, plural -s/-es included)."""
    return [obj for obj in objects if obj.strip() and re.search(
        rf"(?<![a-z0-9]){re.escape(obj.strip().lower())}(?:s|es)?(?![a-z0-9])", text.lower())]


def clean_rewrite(generated: str) -> str:
    """First non-empty line of the generated text, without an echoed "Rewrite:" label or wrapping quotes."""
    for line in generated.splitlines():
        line = line.strip()
        if line.lower().startswith("rewrite:"):
            line = line[len("rewrite:"):].strip()
        line = line.strip("\"'` ").strip()
        if line:
            return line
    return ""


def load_template(path: str | os.PathLike | None) -> str:
    """The prompt template at ``path`` (default :data:`DEFAULT_TEMPLATE`), checked: ``{caption}`` required, only
    ``{caption}`` and ``{object}`` placeholders."""
    template = DEFAULT_TEMPLATE if path is None else Path(path).read_text(encoding="utf-8")
    if "{caption}" not in template:
        raise ValueError(f"{path}: the template (--template) has no {{caption}} placeholder.")
    try:
        template.format(caption="", object="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{path}: the template (--template) may only use {{caption}} and {{object}} ({err!r}); write "
                         "literal braces as {{ and }}.") from err
    return template


# ------------------------------------------------------------------------------------------------------- data
def read_pairs(path: str | os.PathLike, split: str | None = None) -> list[PairImage]:
    """One :class:`PairImage` per distinct image of a JSONL pairs file (any ``jsonl`` form whose lines are an image
    with captions), in order of first appearance; optional ``"object"`` (a word or a list) per line."""
    images: dict[Any, PairImage] = {}
    for record in read_records(path, "jsonl", split):
        if record.query.image is None or record.query.text is not None or any(p.image for p in record.positives):
            raise DataFormatError(record.source, "karr-build needs lines of an image with its captions "
                                  "({\"image\": ..., \"text\": ...}).")
        raw = record.fields.get("object", record.fields.get("objects"))
        objects = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else [] if raw is None else None
        if objects is None or not all(isinstance(o, str) and o.strip() for o in objects):
            raise DataFormatError(record.source, f"\"object\" must be a word or a list of words, got {raw!r}.")
        texts, key = [p.text for p in record.positives], image_key(record.query.image)
        if key not in images:
            images[key] = PairImage(Path(record.query.image), texts, list(objects), record.split,
                                    str(record.fields["id"]) if "id" in record.fields else None)
        else:
            images[key].captions.extend(texts)
            images[key].objects.extend(o for o in objects if o not in images[key].objects)
    return list(images.values())


# -------------------------------------------------------------------------------------------------- generation
def rewrite_captions(backbone: Any, processor: Any, prompts: list[str], images: list[Path] | None = None,
                     max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """(N) greedy continuations of ``backbone.generate`` (``SLQModel.backbone``: the weights SLQ embeds with) for
    (N) ``prompts``, each one user turn of the chat template, after its image when ``images`` are given."""
    import torch

    from ..modeling.image_files import image_budget, load_image

    # Images go through the checks and conversions of every image input (allowed formats only: an EPS named .png
    # never reaches Ghostscript; decoded-size limit, EXIF orientation, transparency on white, shrunk to the budget).
    budget = image_budget(processor) if images is not None else None
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        conversations = []
        for i in range(start, min(start + batch_size, len(prompts))):
            content: list[dict[str, Any]] = [{"type": "text", "text": prompts[i]}]
            if images is not None:
                content.insert(0, {"type": "image", "image": load_image(images[i], budget=budget)})
            conversations.append([{"role": "user", "content": content}])
        # Left padding: every row continues its last token (a call option, so the shared processor keeps its own).
        batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt",
                                              processor_kwargs={"padding": True, "padding_side": "left"})
        with torch.inference_mode():
            generated = backbone.generate(**batch.to(backbone.device), max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(processor.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def build_karr(pairs: list[PairImage], out: str | os.PathLike, rewrite: Callable[[list[str], list[Path]], list[str]],
               template: str = DEFAULT_TEMPLATE, default_split: str = "test") -> KarrBuildStats:
    """Rewrite each image's first caption with ``rewrite`` (prompts (N), images (N) -> texts (N), e.g.
    :func:`rewrite_captions` bound to a model) and write the kept ones to ``out`` in the KARR layout, image paths
    relative to its folder; ``default_split`` is the split of lines whose input gave none. When no rewrite is kept,
    ``out`` is left as it was (an empty file is no KARR set, and a previous run's set would be lost)."""
    out = Path(out)
    objects = [pair.objects or object_words(pair.captions[0]) for pair in pairs]
    prompts = [template.format(caption=pair.captions[0], object=", ".join(words) or "the object")
               for pair, words in zip(pairs, objects)]
    generated = rewrite(prompts, [pair.image for pair in pairs])
    if len(generated) != len(pairs):
        raise RuntimeError(f"rewrite returned {len(generated)} texts for {len(pairs)} prompts.")
    lines, skipped = [], []
    for index, (pair, words, text) in enumerate(zip(pairs, objects, generated)):
        knowledge = clean_rewrite(text)
        leaked = leaked_words(knowledge, words)
        if not knowledge or leaked:
            skipped.append({"image": str(pair.image), "caption": pair.captions[0], "rewrite": knowledge,
                            "reason": f"leaks {leaked}" if leaked else "empty"})
            continue
        lines.append({"image": os.path.relpath(pair.image.resolve(), out.resolve().parent), "knowledge": knowledge,
                      "caption": pair.captions[0], "split": pair.split or default_split,
                      "id": pair.id if pair.id is not None else str(index)})
    if lines:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return KarrBuildStats(written=len(lines), skipped=skipped)


def load_generator(model: str, device: str | None = None, backbone: str | None = None) -> tuple[Any, Any]:
    """(backbone, processor) from an SLQ folder (its backbone; ``backbone`` loads another copy of it) or a plain
    backbone folder / Hub id."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..modeling import SLQModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if AutoConfig.from_pretrained(model).model_type == "slq":
        slq = SLQModel.from_pretrained(model, backbone_name_or_path=backbone).to(device)
        return slq.backbone, slq.processor
    generator = AutoModelForImageTextToText.from_pretrained(backbone or model).to(device).eval()
    return generator, AutoProcessor.from_pretrained(backbone or model)


def karr_build(data: str | os.PathLike, model: str, out: str | os.PathLike, *,
               template: str | os.PathLike | None = None, with_image: bool = False, max_new_tokens: int = 48,
               batch_size: int = 8, limit: int | None = None, split: str = "test",
               skipped: str | os.PathLike | None = None, device: str | None = None,
               backbone: str | None = None) -> KarrBuildStats:
    """Read ``data``, rewrite every image's first caption with ``model``'s backbone, write ``out`` (KARR layout).

    ``skipped`` receives the rewrites that were dropped (leaked the object word, or empty), as JSONL.
    Input errors (data, template, options) are raised before the model is loaded.
    """
    for option, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{option.replace('_', '-')} ({option}=) must be a positive integer, got {value!r}.")
    check_distinct_files({"--data": data, "--template": template, "--out": out, "--skipped": skipped})
    prompt = load_template(template)
    pairs = read_pairs(data)[:limit]
    generator, processor = load_generator(model, device, backbone)

    def rewrite(prompts: list[str], images: list[Path]) -> list[str]:
        return rewrite_captions(generator, processor, prompts, images if with_image else None,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)

    stats = build_karr(pairs, out, rewrite, prompt, default_split=split)
    if skipped:
        skipped = Path(skipped)
        skipped.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in stats.skipped)
        atomic_write(skipped, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return stats
