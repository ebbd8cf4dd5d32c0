"""`slq-hf search`: query an index built by `slq-hf index build` with texts or images."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import add_model_options, load_model
from .reporting import report

DESCRIPTION = """\
Search INDEX_DIR with one or more text or image queries; prints the ranked items (rank, score, id, path or text).

The query is embedded with the model that built the index: by default the SLQ folder recorded in the index's
manifest; --model overrides it, and a model with other weights, config or query set is refused (its embeddings
would not be comparable). The queries use the query set that embedded the corpus, or --query-set NAME (a model
trained with separate "query" and "document" sets). Results come for the --text queries first, then the --image
ones. --json prints one {"query", "results": [{"rank", "score", "id", "path", "text", "metadata", ...}]} object
per line, for scripts.
--rerank K re-orders the top K with the frozen backbone's own likelihood of each (query, item) pair
(slq_hf.modeling.reranking), then keeps -k.
"""

EPILOG = """\
examples:
  slq-hf search photos_index --text "an animal with nine lives"
  slq-hf search photos_index --image query.jpg -k 5 --json
  slq-hf search photos_index --text "a red triangle" --rerank 20 -k 5
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("search", help="search an index with texts or images (ranked results / JSON)",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("index_dir", metavar="INDEX_DIR")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image query (repeatable)")
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    parser.add_argument("--rerank", type=int, metavar="K", default=None,
                        help="rerank the top K embedding hits with the backbone's likelihood, then keep -k")
    parser.add_argument("--rescore-multiplier", type=int, default=None, metavar="M",
                        help="lossy indexes: rescore k x M candidates in float32 (default: 4)")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF indexes: lists to visit (default: nlist/16, at least 16)")
    parser.add_argument("--query-set", metavar="NAME", default=None,
                        help="embed the queries with this query set of the model, e.g. 'query' for an index built "
                             "with --query-set document (default: the set that embedded the corpus)")
    add_model_options(parser, what="SLQ folder (or Hub id) to embed queries with (default: the one that built the "
                                   "index)")
    parser._option_string_actions["--model"].required = False
    parser.set_defaults(func=run)
    return parser


def _print_hits(query: str, hits: list) -> None:
    print(f"query: {query}")
    for hit in hits:
        shown = hit.path or hit.image or hit.text or ""
        extra = "" if hit.rerank_score is None else f"  (rerank {hit.rerank_score:.3f})"
        print(f"  {hit.rank:>3}. {hit.score:.4f}  {hit.id}  {shown if shown != hit.id else ''}{extra}".rstrip())


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    queries = [(text, text) for text in args.text] + [(f"image {path}", Path(path)) for path in args.image]

    def search() -> list:
        from ..retrieval import CorpusIndex
        from ..retrieval.search import rerank_hits

        if not queries:
            raise ValueError("give at least one --text or --image query.")
        if args.k < 1 or (args.rerank is not None and args.rerank < args.k):
            raise ValueError(f"-k must be positive and --rerank (if given) at least -k; got -k {args.k}, --rerank "
                             f"{args.rerank}.")
        for _, value in queries:
            if isinstance(value, Path) and not value.is_file():
                raise FileNotFoundError(f"query image {str(value)!r} not found.")
        index = CorpusIndex.load(args.index_dir, nprobe=args.nprobe)
        if args.model is None:
            args.model = index.manifest["model"].get("source")
            if not args.model:
                raise ValueError(f"{args.index_dir} does not record which model built it (built from Python without "
                                 "model_source=); pass --model SLQ_DIR.")
            if os.path.isabs(args.model) and not os.path.exists(args.model):  # moved or deleted since the build
                raise ValueError(f"{args.index_dir} was built by the SLQ folder {args.model}, which no longer exists; "
                                 "pass --model SLQ_DIR (the folder where it is now).")
        model = load_model(args)
        depth = args.rerank or args.k
        results = index.search(model, [value for _, value in queries], k=depth, query_set=args.query_set,
                               rescore_multiplier=args.rescore_multiplier)
        if args.rerank:
            results = [rerank_hits(model, value, hits)[: args.k] for (_, value), hits in zip(queries, results)]
        return results

    def done(results: list) -> None:
        for (label, _), hits in zip(queries, results):
            if args.json:
                print(json.dumps({"query": label, "results": [hit.to_dict() for hit in hits]}, default=str))
            else:
                _print_hits(label, hits)
        sys.stdout.flush()

    return report("search", search, done)
