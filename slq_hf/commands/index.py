"""`slq-hf index`: build a searchable corpus index (sharded, resumable, torchrun-ready) and export it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_options, load_model
from .reporting import report

DESCRIPTION = """\
Build a FAISS index of a corpus with a saved SLQ model, or export a built index to Qdrant.

  slq-hf index build --model SLQ_DIR --data PATH --out INDEX_DIR

PATH is a folder of images (searched recursively), a JSONL of items ({"id"?, "image"?, "text"?, ...metadata}; image
paths relative to the file; an item with both is embedded as an image+text pair; other keys are metadata), or any
layout `slq-hf eval` reads (--format karpathy|jsonl|karr|hf: their images are indexed, captions kept as metadata).

Encoding runs in shards written to INDEX_DIR/shards as they finish (float32 safetensors + Parquet rows). Re-running
the same command resumes: finished shards are skipped. A different model or changed data is refused (never mixed)
unless --overwrite. Bad items (unreadable images, empty texts) are skipped and listed in INDEX_DIR/bad_items.jsonl;
--strict stops at the first. Changing only --precision/--faiss rebuilds the index from the shards, no re-encoding.

Several processes: torchrun --nproc_per_node N $(which slq-hf) index build ... splits the shards over the ranks
(GPUs, or CPU processes with gloo); the files are the same as with one process.
"""

EPILOG = """\
examples:
  slq-hf index build --model slq-qwen3vl-2b --data photos/ --out photos_index
  slq-hf index build --model slq-qwen3vl-2b --data items.jsonl --out items_index --precision ubinary
  torchrun --nproc_per_node 2 $(which slq-hf) index build --model slq-qwen3vl-2b --data photos/ --out photos_index
  slq-hf index export photos_index --qdrant-path qdrant_db --collection photos
  slq-hf index info photos_index
"""

PRECISIONS = ("float32", "float16", "int8", "ubinary")
FORMATS = ("auto", "folder", "items", "karpathy", "jsonl", "karr", "hf")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("index", help="build a FAISS index of a corpus (resumable, torchrun) / export it",
                                   description=DESCRIPTION, epilog=EPILOG)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="encode a corpus into shards and build its FAISS index",
                               description=DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(build)
    build.add_argument("--data", required=True, metavar="PATH", help="image folder, items JSONL or an eval layout")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder (created; resumed if present)")
    build.add_argument("--format", choices=FORMATS, default="auto", help="data layout (default: guessed from PATH)")
    build.add_argument("--split", default="all", help="eval layouts: the split to index (default: all lines)")
    build.add_argument("--image-root", metavar="DIR", help="karpathy: folder holding filepath/filename")
    build.add_argument("--batch-size", type=int, default=16, help="encode batch size (default: 16)")
    build.add_argument("--shard-size", type=int, default=10_000,
                       help="items per shard, the unit of resume and of work split over ranks (default: 10000)")
    build.add_argument("--precision", choices=PRECISIONS, default="float32",
                       help="how the index stores vectors: float32, float16 (SQfp16), int8 (SQ8) or ubinary (1 bit "
                            "a dimension, searched by Hamming distance, rescored in float32) (default: float32)")
    build.add_argument("--faiss", metavar="FACTORY", default=None,
                       help="FAISS index-factory string, e.g. Flat, HNSW32, IVF4096,PQ64 (default: Flat up to 2M "
                            "vectors, else HNSW32)")
    build.add_argument("--query-set", metavar="NAME", help="embed with this query set (default: the active one)")
    build.add_argument("--overwrite", action="store_true",
                       help="start over when INDEX_DIR holds an index of another model or data (the earlier "
                            "build is kept in INDEX_DIR/.replaced until the new one is complete, and put back if it "
                            "fails)")
    build.add_argument("--strict", action="store_true", help="stop at the first bad item instead of skipping it")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.set_defaults(func=run_build)

    export = actions.add_parser("export", help="copy a built index (vectors, ids, metadata) into Qdrant",
                                description="Export INDEX_DIR to a Qdrant collection: local mode with --qdrant-path "
                                "(embedded, no server), or a server with --qdrant-url; the same client code path.")
    export.add_argument("index_dir", metavar="INDEX_DIR")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--qdrant-path", metavar="DIR", help="local Qdrant folder (embedded mode)")
    where.add_argument("--qdrant-url", metavar="URL", help="Qdrant server, e.g. http://localhost:6333")
    export.add_argument("--api-key", help="Qdrant API key (servers / Qdrant Cloud); also read from QDRANT_API_KEY")
    export.add_argument("--collection", required=True, help="collection name")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing collection of that name (the old one goes only once the new one is "
                             "complete; the name then becomes an alias of the new collection)")
    export.add_argument("--no-progress", action="store_true", help="hide progress bars")
    export.set_defaults(func=run_export)

    info = actions.add_parser("info", help="print an index's manifest (model, data, settings, counts) as JSON")
    info.add_argument("index_dir", metavar="INDEX_DIR")
    info.set_defaults(func=run_info)
    return parser


def run_build(args: argparse.Namespace) -> int:
    def build() -> dict:
        from ..retrieval import build_index
        from ..retrieval.distributed import rank_device
        from ..retrieval.faiss_index import resolve_factory

        for name in ("batch_size", "shard_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
        if args.faiss:
            resolve_factory(args.faiss, args.precision)  # fail before loading the model
        blocker = next((p for p in (Path(args.out), *Path(args.out).parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ValueError(f"--out {args.out}: {blocker} is a file; the index is a folder. Choose another --out.")
        if args.device is None:
            args.device = rank_device()
        model = load_model(args)
        return build_index(model, args.data, args.out, format=args.format, split=None if args.split == "all"
                           else args.split, image_root=args.image_root, batch_size=args.batch_size,
                           shard_size=args.shard_size, precision=args.precision, faiss_factory=args.faiss,
                           query_set=args.query_set, overwrite=args.overwrite, strict=args.strict,
                           show_progress_bar=False if args.no_progress else None,
                           model_source=args.model)

    def done(manifest: dict) -> None:
        run = manifest.get("run")
        if run is None:  # a non-zero torchrun rank: rank 0 reports
            return
        info = manifest["index"]
        print(f"Index {args.out}: {manifest['num_vectors']} vectors ({info['factory']}, {info['precision']}); "
              f"{run['encoded_shards']} shards encoded, {run['skipped_shards']} already finished (skipped); "
              f"{run['bad_items']} bad items"
              + (f" listed in {args.out}/bad_items.jsonl" if run["bad_items"] else "")
              + f"; {run['seconds']:.1f}s.", file=sys.stderr)

    return report("index build", build, done)


def run_export(args: argparse.Namespace) -> int:
    import os

    def export() -> dict:
        from ..retrieval import export_qdrant

        return export_qdrant(args.index_dir, args.collection, path=args.qdrant_path, url=args.qdrant_url,
                             api_key=args.api_key or os.environ.get("QDRANT_API_KEY"), overwrite=args.overwrite,
                             show_progress_bar=False if args.no_progress else None)

    def done(result: dict) -> None:
        where = args.qdrant_path or args.qdrant_url
        print(f"Exported {result['points']} points ({result['dim']}-dim, cosine) to Qdrant collection "
              f"{result['collection']!r} at {where}.", file=sys.stderr)

    return report("index export", export, done)


def run_info(args: argparse.Namespace) -> int:
    def info() -> dict:
        from ..retrieval.manifest import read_manifest

        manifest = read_manifest(args.index_dir)
        if manifest is None:
            raise FileNotFoundError(f"{args.index_dir}: no manifest.json; not an slq_hf index.")
        return manifest

    return report("index info", info, lambda manifest: print(json.dumps(manifest, indent=2, sort_keys=True)))
