"""`slq-hf eval`: image-text retrieval evaluation of a saved SLQ folder."""

from __future__ import annotations

import argparse
import sys

from ..data import readers
from ..data.records import check_distinct_files
from .common import add_model_options, check_output_file, load_model
from .reporting import report

FORMATS_HELP = (readers.__doc__ or "").split("\n", 2)[-1]  # the format list of the readers' table
DESCRIPTION = """\
Evaluate a saved SLQ model on an image-text retrieval set: Recall@1/5/10 both ways (image->text is a hit when any
of the image's captions is in the top k), mean/median rank, recall with duplicate captions counted as hits,
composed image retrieval when the data has (reference, text, target) queries, and the modality gap
||mean(img) - mean(txt)|| with a PCA figure. Prints a table; writes results JSON and the PNG.

Data formats (--format, guessed from the path by default; training reads the same ones):
""" + FORMATS_HELP

EPILOG = """\
example:
  slq-hf eval --model slq-qwen3vl-2b --data flickr30k/dataset_flickr30k.json --image-root flickr30k/images \\
      --split test --output results.json --gap-plot gap.png --cache-dir .slq_cache
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="image-text retrieval evaluation (recall, ranks, modality gap)",
                                   description=DESCRIPTION, epilog=EPILOG)
    add_model_options(parser)
    parser.add_argument("--data", required=True, metavar="PATH", help="data file or datasets folder")
    parser.add_argument("--format", choices=["auto", "karpathy", "jsonl", "karr", "hf"], default="auto",
                        help="data layout (default: guessed from PATH)")
    parser.add_argument("--split", default="test", help="split to evaluate; 'all' for every line (default: test)")
    parser.add_argument("--image-root", metavar="DIR", help="karpathy: folder holding filepath/filename")
    parser.add_argument("--text-field", choices=["knowledge", "caption"],
                        help="karr: which caption to retrieve with (default: knowledge)")
    parser.add_argument("--image-column", help="hf: image column (default: detected)")
    parser.add_argument("--text-column", help="hf: text column (default: detected)")
    parser.add_argument("--max-captions", type=int, metavar="N", help="karpathy: keep at most N captions per image")
    parser.add_argument("--output", metavar="JSON", help="write the results here")
    parser.add_argument("--gap-plot", metavar="PNG", help="write the modality-gap PCA figure here")
    parser.add_argument("--cache-dir", metavar="DIR", help="reuse/store embeddings here (safetensors)")
    parser.add_argument("--batch-size", type=int, default=16, help="encode batch size (default: 16)")
    parser.add_argument("--rerank-top-k", type=int, metavar="K",
                        help="also rerank each query's top K with the model's own frozen backbone and report recall "
                             "before and after, both directions (cost: K backbone forwards per text query)")
    parser.add_argument("--rerank-scorer", choices=["likelihood", "yes_no"], default=None,
                        help="likelihood: log-probability of the caption as the backbone's answer to the image (any "
                             "captioning backbone); yes_no: logit('yes') - logit('no') after asking whether they "
                             "match (instruction-tuned backbones) (default: likelihood)")
    parser.add_argument("--rerank-rewrite", metavar="TEMPLATE",
                        help="before reranking, the backbone answers this user turn ('{text}' = each caption) and "
                             "its answer is scored instead: for captions the backbone would not write itself, e.g. "
                             "knowledge captions (see README 'Rerank with the backbone')")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)
    return parser


def _check_rerank_options(args: argparse.Namespace) -> None:
    """The rerank options only act with --rerank-top-k: without it they would be accepted and silently ignored."""
    options = (("--rerank-scorer", args.rerank_scorer), ("--rerank-rewrite", args.rerank_rewrite))
    given = [flag for flag, value in options if value is not None]
    if args.rerank_top_k is None and given:
        raise ValueError(f"{', '.join(given)} only apply when reranking; add --rerank-top-k K (e.g. 10) or drop them.")
    if args.rerank_top_k is not None and args.rerank_top_k < 1:
        raise ValueError(f"--rerank-top-k must be positive, got {args.rerank_top_k}.")


def run(args: argparse.Namespace) -> int:
    from ..data import detect_format
    from ..evaluation import evaluate_retrieval, format_results_table, load_retrieval_dataset, save_results_json
    from ..hub.card import queries_digest

    def evaluate() -> dict:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}.")
        _check_rerank_options(args)
        check_output_file(args.output, "--output")
        check_output_file(args.gap_plot, "--gap-plot")
        # --output and --gap-plot are written after the run: one path for both (or for --data) would replace it.
        check_distinct_files({"--data": args.data, "--output": args.output, "--gap-plot": args.gap_plot})
        dataset = load_retrieval_dataset(args.data, args.format, args.split, image_root=args.image_root,
                                         text_field=args.text_field, image_column=args.image_column,
                                         text_column=args.text_column, max_captions=args.max_captions)
        model = load_model(args)  # after the data: a typo in --data fails in a second, not after a model load
        print(f"Evaluating {args.model} on {dataset!r}", file=sys.stderr)
        result = evaluate_retrieval(model, dataset, batch_size=args.batch_size, cache_dir=args.cache_dir,
                                    gap_plot=args.gap_plot, show_progress_bar=False if args.no_progress else None,
                                    rerank_top_k=args.rerank_top_k, rerank_scorer=args.rerank_scorer or "likelihood",
                                    rerank_kwargs={"rewrite": args.rerank_rewrite})
        # queries_sha256: which queries produced these numbers; `slq-hf export` refuses to put them on another model's
        # card. The split is the one the data has (None for a file without splits), as the dataset name says.
        result["model"] = {"path": str(args.model), "backbone": model.config.backbone_name_or_path,
                           "num_queries": model.config.num_queries,
                           "queries_sha256": queries_digest(model.trainable_state_dict())}
        result["data"] = {"path": str(args.data),
                          "format": detect_format(args.data) if args.format == "auto" else args.format,
                          "split": dataset.split}
        return result

    def done(result: dict) -> None:
        print(format_results_table(result))
        if args.gap_plot and result["gap_plot"] is None:
            print("(no captions in the data: modality-gap figure skipped)", file=sys.stderr)
        if args.output:
            print(f"results: {save_results_json(result, args.output)}", file=sys.stderr)
        if result["gap_plot"]:
            print(f"modality-gap figure: {result['gap_plot']}", file=sys.stderr)

    return report("eval", evaluate, done)
