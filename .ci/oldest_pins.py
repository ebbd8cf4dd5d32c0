"""Print `NAME==FLOOR` for the named requirements, read from pyproject.toml (dependencies and extras).

    python .ci/oldest_pins.py transformers sentence-transformers   # -> transformers==5.20 sentence-transformers==6.0

`make test-oldest` installs these pins so the suite runs against the oldest versions pyproject allows; the floors are
written once, in pyproject.toml. Exits non-zero naming the package when it has no `>=` floor there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor(name: str, text: str) -> str:
    # A requirement string such as "sentence-transformers>=6.0,<7" anywhere in the file (names compared
    # case-insensitively, '-' and '_' alike, as pip does).
    pattern = "[-_]".join(re.escape(part) for part in re.split(r"[-_]", name))
    found = re.findall(rf'"{pattern}(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9a-zA-Z.]*)', text, flags=re.IGNORECASE)
    if not found:
        raise SystemExit(f"{PYPROJECT.name}: no '{name}>=VERSION' requirement to take the oldest version from")
    if len(set(found)) > 1:
        raise SystemExit(f"{PYPROJECT.name}: '{name}' has different floors {sorted(set(found))}; keep one")
    return found[0]


def main(names: list[str]) -> None:
    if not names:
        raise SystemExit(__doc__)
    text = PYPROJECT.read_text()
    print(" ".join(f"{name}=={floor(name, text)}" for name in names))


if __name__ == "__main__":
    main(sys.argv[1:])
