"""Run every benchmark and refresh its section of BENCHMARKS.md (`make bench`). Takes a few hours on 2 cores
(the 1M-vector search and the multi-seed training recipe dominate); `--only` picks some. encode_memory.py and
batch_invariance.py print their tables only; BENCHMARKS.md gives their commands.

    .venv/bin/python benchmarks/run_all.py [--only encode train_step ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# script -> its arguments; each script fills its own BENCHMARKS.md section. "{out}" is BENCHMARKS.md's path (scripts
# whose --write is a flag know the path themselves).
WRITE_TO = ["--write", "{out}"]
SCRIPTS = {
    "backbone_memory": WRITE_TO,
    "encode": WRITE_TO,
    "train_step": WRITE_TO,
    "query_sets": WRITE_TO,
    "budgets": ["--write"],
    "gradcache": ["--write"],
    "train_recipe": ["--write"],
    "rerank": WRITE_TO,
    "index_encode": WRITE_TO,
    "index_search": WRITE_TO,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run only these benchmarks")
    args = parser.parse_args()
    target = HERE.parent / "BENCHMARKS.md"
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        command = [sys.executable, str(HERE / f"{name}.py"), *(a.format(out=target) for a in SCRIPTS[name])]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
