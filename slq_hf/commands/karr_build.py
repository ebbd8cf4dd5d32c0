"""`slq-hf karr-build`: explicit image captions -> a KARR-style knowledge retrieval set, written by the backbone.

KARR-Bench (the SLQ paper's knowledge-aware retrieval benchmark) describes every image only through world knowledge
and reasoning ("a grey cat on a bookshelf" -> "the animal with (2+7) lives sitting on a bookshelf"). This command
builds such a set from any pairs file with the SAME frozen backbone an SLQ model runs on: its own greedy
``generate()`` rewrites each image's caption with a documented few-shot prompt (:data:`DEFAULT_TEMPLATE`, or your own
with ``--template``), rewrites that still name the object are skipped and counted, and the result is written in the
KARR layout ``slq-hf eval --format karr`` reads. Quality depends entirely on the backbone: a real MLLM writes good
knowledge captions, a tiny test backbone only exercises the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

_TEXT_KEYS = ("text", "caption", "texts", "captions")
_OBJECT_KEYS = ("object", "objects")
# Words that end the first noun phrase of a caption ("a grey cat | on a bookshelf"): its last word before them is
# taken as the object when the line names none.
_PHRASE_ENDS = frozenset(
    "on in at with next near under over by of from behind beside above below inside outside into onto through "
    "and or while that which who is are was were has have sitting standing lying holding eating playing looking "
    "walking running flying parked hanging".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")

DESCRIPTION = (__doc__ or "").split("\n\n", 1)[-1] + """
Input (--data): JSONL, one object a line, image paths relative to the file: {"image": "a.jpg", "text": "a grey cat
on a bookshelf"} ("caption"/"texts"/"captions" work too; lines naming the same image add captions, the first one is
rewritten). Optional per line: "object": "cat" (or a list) = the word(s) a rewrite must not contain; "split"; "id".
Without "object", the object is the last word of the caption's first noun phrase ("a grey cat on ..." -> "cat"),
a heuristic: give "object" where it matters ("a carrot stick" -> "stick" otherwise).

Output (--out): the KARR layout, one line per kept image, image paths relative to the output file:
  {"image": "...", "knowledge": "<rewrite>", "caption": "<original caption>", "split": "test", "id": "..."}
A rewrite is skipped (and counted) when it contains an object word (whole word, also with a plural -s/-es) or is
empty. --model is a saved SLQ folder (its backbone generates; the same loaded model can then be evaluated) or a
plain backbone folder / Hub id. The default prompt template (--template FILE overrides it; use {caption} and
{object}) is:

""" + DEFAULT_TEMPLATE

EPILOG = """\
example:
  slq-hf karr-build --data coco_pairs.jsonl --model slq-qwen3vl-2b --out karr.jsonl --with-image --limit 500
  slq-hf eval --model slq-qwen3vl-2b --data karr.jsonl --format karr
"""


@dataclass
class PairImage:
    """One image of the pairs file with its captions and the words its rewrite must not contain."""

    image: Path
    captions: list[str]
    objects: list[str]
    split: str | None = None
    id: str | None = None
    line: int = 0


@dataclass
class KarrBuildStats:
    """What happened to every image: kept, or skipped because the rewrite leaked an object word or was empty."""

    written: int = 0
    skipped_leak: int = 0
    skipped_empty: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.written + self.skipped_leak + self.skipped_empty


# ------------------------------------------------------------------------------------------------------- text
def object_words(caption: str) -> list[str]:
    """The object of an explicit caption by a simple rule: the last word of its first noun phrase.

    "a grey cat on a bookshelf" -> ["cat"]; "a red triangle in the top left" -> ["triangle"].
    """
    words = _WORD.findall(caption.lower())
    phrase = []
    for word in words:
        if word in _PHRASE_ENDS and phrase:
            break
        phrase.append(word)
    return phrase[-1:] if phrase else []


def leaked_words(text: str, objects: Sequence[str]) -> list[str]:
    """Object words that ``text`` contains as whole words (case-insensitive, plural -s/-es included)."""
    leaked = []
    for obj in objects:
        stem = obj.strip().lower()
        if stem and re.search(rf"(?<![a-z0-9]){re.escape(stem)}(?:s|es)?(?![a-z0-9])", text.lower()):
            leaked.append(obj)
    return leaked


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


# ------------------------------------------------------------------------------------------------------- data
def read_pairs(path: str | os.PathLike) -> list[PairImage]:
    """Read a pairs JSONL file into one :class:`PairImage` per distinct image (order of first appearance)."""
    from ..evaluation import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "data file not found.")
    images: dict[Path, PairImage] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, f"invalid JSON at column {err.colno}: {err.msg}.", number) from err
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"].strip():
            raise DataFormatError(path, "a pairs line needs \"image\" (a path) and a caption.", number)
        present = [k for k in _TEXT_KEYS if k in record]
        if len(present) != 1:
            raise DataFormatError(path, f"a pairs line needs exactly one of {list(_TEXT_KEYS)}; got {present}.",
                                  number)
        value = record[present[0]]
        captions = [value] if isinstance(value, str) else value
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                    for c in captions):
            raise DataFormatError(path, f"{present[0]!r} must be a non-empty caption or a list of them.", number)
        raw_objects = next((record[k] for k in _OBJECT_KEYS if k in record), None)
        objects = [raw_objects] if isinstance(raw_objects, str) else list(raw_objects or [])
        if not all(isinstance(o, str) and o.strip() for o in objects):
            raise DataFormatError(path, f"\"object\" must be a word or a list of words, got {raw_objects!r}.", number)
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataFormatError(path, f"image file {record['image']!r} not found (looked at {image}).", number)
        key = image.resolve()
        if key in images:
            entry = images[key]
            entry.captions.extend(captions)
            entry.objects.extend(o for o in objects if o not in entry.objects)
            continue
        images[key] = PairImage(image, list(captions), objects, record.get("split"),
                                str(record["id"]) if "id" in record else None, number)
    if not images:
        raise DataFormatError(path, "the file holds no pairs.")
    return list(images.values())


# -------------------------------------------------------------------------------------------------- generation
def rewrite_captions(backbone: Any, processor: Any, prompts: list[str], images: list[Path] | None = None,
                     max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy ``backbone.generate`` on each prompt, rendered as one user turn of the backbone's chat template.

    Args:
        backbone: the ``*ForConditionalGeneration`` model (``SLQModel.backbone``: the weights SLQ embeds with).
        processor: its processor (chat template, tokenizer, image processor).
        prompts: (N) user texts.
        images: optional (N) images shown before each prompt (``--with-image``).

    Returns:
        (N) generated continuations, decoded without special tokens.
    """
    import torch
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    outputs: list[str] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            conversations = []
            for i in chunk:
                content: list[dict[str, Any]] = [{"type": "text", "text": prompts[i]}]
                if images is not None:
                    with Image.open(images[i]) as img:
                        content.insert(0, {"type": "image", "image": img.convert("RGB")})
                conversations.append([{"role": "user", "content": content}])
            batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt",
                                                  processor_kwargs={"padding": True})
            batch = {k: v.to(backbone.device) if hasattr(v, "to") else v for k, v in batch.items()}
            with torch.inference_mode():
                generated = backbone.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def build_karr(pairs: list[PairImage], out: str | os.PathLike, rewrite: Callable[[list[str], list[Path]], list[str]],
               template: str = DEFAULT_TEMPLATE, default_split: str = "test") -> KarrBuildStats:
    """Rewrite each image's first caption with ``rewrite`` and write the kept ones to ``out`` in the KARR layout.

    Args:
        pairs: images with captions (see :func:`read_pairs`).
        out: output JSONL path; image paths are written relative to its folder.
        rewrite: prompts (N), images (N) -> generated texts (N), e.g. :func:`rewrite_captions` bound to a model.
        template: prompt with ``{caption}`` and ``{object}`` placeholders.
        default_split: ``split`` of lines whose input gave none.
    """
    out = Path(out)
    objects = [pair.objects or object_words(pair.captions[0]) for pair in pairs]
    prompts = [template.format(caption=pair.captions[0], object=", ".join(words) or "the object")
               for pair, words in zip(pairs, objects)]
    generated = rewrite(prompts, [pair.image for pair in pairs])
    if len(generated) != len(pairs):
        raise RuntimeError(f"rewrite returned {len(generated)} texts for {len(pairs)} prompts.")
    stats = KarrBuildStats()
    lines = []
    for index, (pair, words, text) in enumerate(zip(pairs, objects, generated)):
        knowledge = clean_rewrite(text)
        leaked = leaked_words(knowledge, words)
        if not knowledge or leaked:
            stats.skipped.append({"image": str(pair.image), "caption": pair.captions[0], "rewrite": knowledge,
                                  "reason": f"leaks {leaked}" if leaked else "empty"})
            if leaked:
                stats.skipped_leak += 1
            else:
                stats.skipped_empty += 1
            continue
        lines.append({"image": os.path.relpath(pair.image.resolve(), out.resolve().parent), "knowledge": knowledge,
                      "caption": pair.captions[0], "split": pair.split or default_split,
                      "id": pair.id if pair.id is not None else str(index)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    stats.written = len(lines)
    return stats


# --------------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("karr-build", help="build a KARR-style knowledge retrieval set with the backbone",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, metavar="JSONL", help="pairs file (image + explicit caption)")
    parser.add_argument("--model", required=True, metavar="DIR", help="SLQ folder or backbone folder / Hub id")
    parser.add_argument("--out", required=True, metavar="JSONL", help="KARR layout output")
    parser.add_argument("--template", metavar="FILE", help="prompt template with {caption} and {object}")
    parser.add_argument("--with-image", action="store_true", help="show the image to the backbone too")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="rewrite length limit (default: 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    parser.add_argument("--split", default="test", help="split of lines whose input has none (default: test)")
    parser.add_argument("--skipped", metavar="JSONL", help="write the skipped rewrites here, for inspection")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)
    return parser


def load_generator(model: str, device: str | None = None) -> tuple[Any, Any]:
    """(backbone, processor) from an SLQ folder (its backbone) or a plain backbone folder / Hub id."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .. import SLQModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if AutoConfig.from_pretrained(model).model_type == "slq":
        slq = SLQModel.from_pretrained(model).to(device)
        return slq.backbone, slq.processor
    backbone = AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
    return backbone, AutoProcessor.from_pretrained(model)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import DataFormatError

    for option in ("max_new_tokens", "batch_size", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            print(f"slq-hf karr-build: error: --{option.replace('_', '-')} must be positive, got {value}.",
                  file=sys.stderr)
            return 2
    template = DEFAULT_TEMPLATE
    if args.template:
        template = Path(args.template).read_text(encoding="utf-8")
        if "{caption}" not in template:
            print(f"slq-hf karr-build: error: {args.template} has no {{caption}} placeholder.", file=sys.stderr)
            return 2
    try:
        template.format(caption="", object="")
    except (KeyError, IndexError, ValueError) as err:
        print(f"slq-hf karr-build: error: the template may only use {{caption}} and {{object}} ({err!r}); write "
              "literal braces as {{ and }}.", file=sys.stderr)
        return 2
    try:
        pairs = read_pairs(args.data)
    except (DataFormatError, OSError) as err:
        print(f"slq-hf karr-build: error: {err}", file=sys.stderr)
        return 2
    pairs = pairs[: args.limit] if args.limit else pairs

    backbone, processor = load_generator(args.model, args.device)

    def rewrite(prompts: list[str], images: list[Path]) -> list[str]:
        return rewrite_captions(backbone, processor, prompts, images if args.with_image else None,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    stats = build_karr(pairs, args.out, rewrite, template, default_split=args.split)
    if args.skipped:
        Path(args.skipped).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in stats.skipped),
                                      encoding="utf-8")
    print(f"karr-build: {stats.total} images: wrote {stats.written} to {args.out}; skipped {stats.skipped_leak} "
          f"that leaked the object word and {stats.skipped_empty} empty rewrites.")
    if not stats.written:
        print("slq-hf karr-build: error: no rewrite was kept; see --skipped and the prompt template.", file=sys.stderr)
        return 1
    return 0
