"""`slq-hf convert-reference`: import queries trained with the SLQ paper's research code."""

from __future__ import annotations

import argparse

from .common import check_model_source
from .reporting import report

DESCRIPTION = """\
Turn latent queries trained with the SLQ paper's research code into an SLQ folder that AutoModel,
SentenceTransformer and `slq-hf export` load. The input is a torch.save file holding a float tensor
[N_q, hidden] (the queries), or [hidden] (one query vector, placed in --num-queries slots, default 1); a dict
with a 'meta_queries' or 'queries' tensor also works.

Safety: the file is read with torch.load(weights_only=True). A file that holds pickled code or custom classes is
refused, never executed. The queries' width is checked against the backbone's hidden size (read from the
backbone's config) before the backbone is loaded.

The backbone is loaded once to pick the query placeholder token and copy its processor; the folder written holds
only the queries (model.safetensors), config.json pinning --backbone/--revision, code and processor files.
"""

EPILOG = """\
example:
  slq-hf convert-reference meta_queries.pt --backbone Qwen/Qwen3-VL-2B-Instruct --revision <commit> \\
      --out slq-qwen3vl-2b
  slq-hf export slq-qwen3vl-2b --out hub/slq-qwen3vl-2b --eval-results results.json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("convert-reference", help="import queries from the paper's research code (.pt)",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("queries", metavar="QUERIES.pt", help="torch.save file: a [N_q, hidden] or [hidden] tensor")
    parser.add_argument("--backbone", required=True, metavar="ID",
                        help="Hub id or path of the backbone the queries were trained on")
    parser.add_argument("--out", required=True, metavar="DIR", help="SLQ folder to write")
    parser.add_argument("--num-queries", type=int, metavar="N",
                        help="[N_q, hidden]: must equal N_q if given; [hidden]: number of query slots (default 1)")
    parser.add_argument("--revision", metavar="REV", help="backbone revision to load and pin in config.json")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="contrastive temperature to store (research files hold only queries; default 0.07)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype to load the backbone in (default: auto = the checkpoint's; the queries are "
                             "always saved in float32)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub import convert_reference

    def convert():
        check_model_source(args.backbone, "--backbone")
        return convert_reference(args.queries, args.backbone, args.out, num_queries=args.num_queries,
                                 revision=args.revision, temperature=args.temperature, dtype=args.dtype)

    return report("convert-reference", convert, lambda out: print(
        f"Wrote SLQ folder {out} (queries from {args.queries}, backbone {args.backbone})."))
