"""Run every benchmark and refresh its section of BENCHMARKS.md (`make bench`). Takes about 30 minutes on 2 cores.

    .venv/bin/python benchmarks/run_all.py [--only encode train_step ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# script -> extra arguments; each script fills its own BENCHMARKS.md section with --write.
SCRIPTS = {
    "backbone_memory": [],
    "encode": [],
    "train_step": [],
    "query_sets": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run only these benchmarks")
    args = parser.parse_args()
    target = HERE.parent / "BENCHMARKS.md"
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        command = [sys.executable, str(HERE / f"{name}.py"), *SCRIPTS[name], "--write", str(target)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
