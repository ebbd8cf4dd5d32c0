"""Corpus search at scale: recall@10 vs exact, queries/s and bytes/vector for Flat, HNSW, IVF-PQ and binary.

Synthetic corpus shaped like SLQ embeddings: L2-normalised, clustered (``--clusters`` centres, each point a centre
plus isotropic noise of the same norm, so same-cluster points have cosine ~0.5 and the true top-10 are separated
from the rest of their cluster by only ~0.01: a hard case for lossy codes). Queries are fresh points of the same
clusters. Every method runs through ``slq_hf.retrieval.faiss_index`` (what ``slq-hf index build`` / ``search``
use), lossy ones with float32 rescoring from the on-disk vectors (a memory-mapped .npy, as the index's shards are).

    nice -n 10 .venv/bin/python benchmarks/index_search.py --write BENCHMARKS.md     # 1M x 512

Bytes/vector is the serialised index (what sits in RAM); the float32 vectors used for rescoring stay on disk.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import check, machine, write_section  # noqa: E402

from slq_hf.retrieval import faiss_index as fi  # noqa: E402

# (label, factory, precision, rescore multiplier, nprobe, efSearch)
METHODS = [
    ("HNSW32 float32", "HNSW32", "float32", 1, None, 128),
    ("IVF-PQ + rescore x10", "IVF{nlist},PQ{pq}", "float32", 10, 32, None),
    ("IVF-PQ + rescore x20", "IVF{nlist},PQ{pq}", "float32", 20, 32, None),
    ("ubinary Flat + rescore x10", "Flat", "ubinary", 10, None, None),
    ("ubinary HNSW32 + rescore x10", "HNSW32", "ubinary", 10, None, 256),
    ("ubinary IVF + rescore x10", "IVF{nlist}", "ubinary", 10, 32, None),
    ("ubinary IVF + rescore x20", "IVF{nlist}", "ubinary", 20, 32, None),
    ("int8 Flat + rescore x4", "Flat", "int8", 4, None, None),
]


def load_average() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def make_corpus(path: Path, n: int, dim: int, clusters: int, queries: int, seed: int = 0):
    """Write (n, dim) float32 corpus rows to ``path`` (.npy, memory-mapped); return (corpus memmap, queries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)
    corpus = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    chunk = 65_536

    def draw(count: int) -> np.ndarray:
        points = centres[rng.integers(0, clusters, count)]
        points = points + rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    for start in range(0, n, chunk):
        corpus[start : start + chunk] = draw(min(chunk, n - start))
    corpus.flush()
    return np.load(path, mmap_mode="r"), draw(queries).astype(np.float32)


def fill(index, corpus: np.ndarray, precision: str) -> float:
    started = time.process_time()
    needed = fi.training_rows(index)
    if needed:
        step = max(1, len(corpus) // needed)
        fi.train(index, np.asarray(corpus[::step][:needed]), precision)
    for start in range(0, len(corpus), 65_536):
        fi.add(index, np.asarray(corpus[start : start + 65_536]), precision)
    return time.process_time() - started


def timed_search(index, queries, k, precision, exact, multiplier, vectors):
    fi.search(index, queries[:8], k, precision=precision, exact_scores=exact, rescore_multiplier=multiplier,
              vectors=vectors)  # warm-up (page cache, FAISS buffers)
    # CPU time of this (single-threaded) process: other jobs on the shared cores stretch wall time, not CPU time.
    started = time.process_time()
    _, ids = fi.search(index, queries, k, precision=precision, exact_scores=exact, rescore_multiplier=multiplier,
                       vectors=vectors)
    return ids, len(queries) / (time.process_time() - started)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def index_file_bytes(index, workdir: Path) -> int:
    faiss = fi.faiss()
    path = workdir / "index.bin"
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, str(path))
    else:
        faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default 1M)")
    parser.add_argument("--dim", type=int, default=512, help="vector width (default 512)")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists (default 1024 = sqrt(1M))")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], help="labels (prefix) of methods to leave out")
    parser.add_argument("--workdir", default=None, help="folder for the corpus file (default: a temp dir)")
    parser.add_argument("--write", type=Path, nargs="?", metavar="BENCHMARKS.md",
                        const=Path(__file__).resolve().parents[1] / "BENCHMARKS.md",
                        help="fill this file's section (default when given without a path: the repo's BENCHMARKS.md)")
    args = parser.parse_args()
    faiss = fi.faiss()
    threads = int(os.environ["OMP_NUM_THREADS"])
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        corpus, queries = make_corpus(workdir / "corpus.npy", args.n, args.dim, args.clusters, args.queries)

        def vectors(ids: np.ndarray) -> np.ndarray:
            return np.asarray(corpus[np.sort(ids)][np.argsort(np.argsort(ids))])

        print(f"corpus {args.n} x {args.dim} ready in {time.perf_counter() - started:.0f}s", flush=True)
        exact = fi.new_index(args.dim, "Flat", "float32")
        fill(exact, corpus, "float32")
        truth, exact_qps = timed_search(exact, queries, args.k, "float32", True, 1, None)
        exact_bytes = index_file_bytes(exact, workdir) / args.n
        del exact
        rows = [("Flat float32 (exact)", 1.0, exact_qps, exact_bytes, 0.0)]
        print(rows[-1], flush=True)
        built: dict = {}
        for label, factory, precision, multiplier, nprobe, ef in METHODS:
            if any(label.startswith(s) for s in args.skip):
                continue
            factory = factory.format(pq=args.dim // 16, nlist=args.nlist)  # PQ: 1 byte / 16 dims (default_factory)
            nprobe = nprobe and max(1, round(nprobe * args.nlist / 1024))  # the same share of the lists
            key = (factory, precision)
            if key not in built:
                built.clear()  # one big index in memory at a time
                index = fi.new_index(args.dim, factory, precision)
                build_s = fill(index, corpus, precision)
                built[key] = (index, build_s, index_file_bytes(index, workdir) / args.n)
            index, build_s, nbytes = built[key]
            fi.configure_search(index, nprobe=nprobe, ef_search=ef)
            exact_scores = fi.is_exact_storage(factory, precision)
            ids, qps = timed_search(index, queries, args.k, precision, exact_scores, multiplier, vectors)
            rows.append((f"{label} (`{factory}`" + (f", nprobe {nprobe}" if nprobe else "")
                         + (f", efSearch {ef}" if ef else "") + ")",
                         recall(ids, truth), qps, nbytes, build_s))
            print(rows[-1], flush=True)
    total = time.perf_counter() - started
    lines = ["| method | recall@10 | queries/CPU-s | x exact QPS | bytes/vector | x exact memory | build CPU-s |",
             "|---|---|---|---|---|---|---|"]
    for label, rec, qps, nbytes, build_s in rows:
        lines.append(f"| {label} | {rec:.3f} | {qps:.1f} | {qps / exact_qps:.1f} | {nbytes:.0f} | "
                     f"{nbytes / exact_bytes:.3f} | {build_s:.0f} |")
    winners = [r for r in rows[1:] if r[1] >= 0.95 and r[2] >= 10 * exact_qps and r[3] <= exact_bytes / 8]
    body = "\n".join([
        "## Corpus search: FAISS precisions and rescoring (issue 13)",
        f"`nice -n 10 .venv/bin/python benchmarks/index_search.py {shlex.join(sys.argv[1:])}` "
        f"({total / 60:.1f} min, "
        f"OMP_NUM_THREADS={threads}; "
        f"{machine()}; shared with other jobs).",
        "",
        f"{args.n:,} synthetic clustered L2-normalised vectors of width {args.dim} ({args.clusters:,} clusters; a "
        "2048-wide corpus needs 8 GB per float copy and hours of index building on 2 shared cores), "
        f"{args.queries} queries, k = {args.k}. Speeds are per CPU-second of one thread (time.process_time), "
        f"because other jobs shared the cores (load average {load_average()} at the end) and stretch wall time. "
        "Lossy codes are rescored in float32 from the vectors on disk "
        "(memory-mapped, as `slq-hf search` reads the shards); bytes/vector counts the index in RAM only.",
        "",
        *lines,
        "",
        "IVF rows probe 1/32 of the lists: on this data a query's true neighbours (cosine ~0.5 to it) are spread "
        "over many lists, so recall is low; raise `nprobe` (`CorpusIndex.load(..., nprobe=)`, `slq-hf search "
        "--nprobe`) for recall at proportionally more time. Float `HNSW32` is left out of the 1M run"
        + (" (`--skip`)" if any("HNSW32 float32".startswith(x) for x in args.skip) else "")
        + ": building its graph over 1M float vectors does not fit the time budget on 2 shared cores; the binary "
        "HNSW row shows the graph index. Rescoring more candidates costs more than it finds here (x20 rows).",
        "",
        check("a configuration with recall@10 >= 0.95 at >= 10x exact QPS and <= 1/8 of its memory"
              + (f" ({', '.join(w[0] for w in winners)})" if winners else ""), bool(winners)),
    ])
    print(body)
    if args.write:
        write_section(args.write, "corpus-search", body)


if __name__ == "__main__":
    main()
