#!/usr/bin/env bash
# Build the slq_hf wheel, install it (not editable) into a fresh venv with the same pinned torch as the Makefile, and
# run tests/smoke_wheel.py from a folder outside the checkout: export, AutoModel and SentenceTransformer on the
# installed package. Usage: .ci/wheel_smoke.sh [PYTHON]   (default python3; the venv is .venv-wheel, rebuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
VENV=.venv-wheel
DIST=build/wheel-smoke
TORCH=$(sed -n 's/^TORCH *:= *//p' Makefile)   # one place for the torch pins: the Makefile

rm -rf "$VENV" "$DIST"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" wheel --quiet --no-deps --wheel-dir "$DIST" .
WHEEL=$(ls "$DIST"/slq_hf-*.whl)
echo "wheel-smoke: built $WHEEL ($(du -h "$WHEEL" | cut -f1))"
# shellcheck disable=SC2086  # TORCH holds two requirement strings
"$VENV/bin/pip" install --quiet $TORCH
"$VENV/bin/pip" install --quiet "$WHEEL[sentence-transformers]"
RUN_DIR=$(mktemp -d)
cp tests/smoke_wheel.py "$RUN_DIR/"
(cd "$RUN_DIR" && "$OLDPWD/$VENV/bin/python" smoke_wheel.py)
rm -rf "$RUN_DIR"
