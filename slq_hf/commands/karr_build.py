"""`slq-hf karr-build`: explicit image captions -> a KARR-style knowledge retrieval set, written by the backbone."""

from __future__ import annotations

import argparse
import os

from ..data.karr_build import DEFAULT_TEMPLATE
from ..data.karr_build import __doc__ as karr_doc
from .common import add_model_options, check_model_source, check_output_file, resolve_device
from .reporting import FAILED, error, report

DESCRIPTION = (karr_doc or "").split("\n\n", 1)[-1] + """
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("karr-build", help="build a KARR-style knowledge retrieval set with the backbone",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--data", required=True, metavar="JSONL", help="pairs file (image + explicit caption)")
    add_model_options(parser, "SLQ folder (its backbone generates) or a backbone folder / Hub id", encodes=False)
    parser.add_argument("--out", required=True, metavar="JSONL", help="KARR layout output")
    parser.add_argument("--template", metavar="FILE", help="prompt template with {caption} and {object}")
    parser.add_argument("--with-image", action="store_true", help="show the image to the backbone too")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="rewrite length limit (default: 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    parser.add_argument("--split", default="test", help="split of lines whose input has none (default: test)")
    parser.add_argument("--skipped", metavar="JSONL", help="write the skipped rewrites here, for inspection")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data.karr_build import karr_build

    def done(stats) -> int | None:
        print(f"karr-build: {stats.total} images: wrote {stats.written} to {args.out}; skipped {stats.skipped_leak} "
              f"that leaked the object word and {stats.skipped_empty} empty rewrites.")
        if not stats.written:
            return error("karr-build", f"no rewrite was kept, so --out {args.out} was left as it was; see --skipped "
                         "and the prompt template.", FAILED)

    def build():
        check_model_source(args.model, "--model")
        check_model_source(args.backbone, "--backbone")
        if args.template is not None and not os.path.isfile(args.template):
            raise ValueError(f"--template {args.template}: no such file; give a text file with {{caption}} (and "
                             "optionally {object}), or drop --template for the default prompt.")
        check_output_file(args.out, "--out")
        check_output_file(args.skipped, "--skipped")
        return karr_build(args.data, args.model, args.out, template=args.template, with_image=args.with_image,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                          split=args.split, skipped=args.skipped, device=resolve_device(args.device),
                          backbone=args.backbone)

    return report("karr-build", build, done)
