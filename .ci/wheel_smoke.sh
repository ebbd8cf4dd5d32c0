#!/usr/bin/env bash
# Build the slq_hf wheel, install it (not editable) into a fresh venv that shares the Makefile's pinned torch, and
# run tests/smoke_wheel.py from a folder outside the checkout: export, AutoModel and SentenceTransformer on the
# installed package. Usage: .ci/wheel_smoke.sh PYTHON TORCH_ENV   (the venv is .venv-wheel, rebuilt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$1
TORCH_ENV=$2
VENV=.venv-wheel
DIST=build/wheel-smoke

rm -rf "$VENV" "$DIST"
.ci/venv_with_torch.sh "$PYTHON" "$TORCH_ENV" "$VENV"
"$VENV/bin/pip" wheel --quiet --no-deps --wheel-dir "$DIST" .
WHEEL=$(ls "$DIST"/slq_hf-*.whl)
echo "wheel-smoke: built $WHEEL ($(du -h "$WHEEL" | cut -f1))"
"$VENV/bin/pip" install --quiet "$WHEEL[sentence-transformers]"
RUN_DIR=$(mktemp -d)
cp tests/smoke_wheel.py "$RUN_DIR/"
(cd "$RUN_DIR" && "$OLDPWD/$VENV/bin/python" smoke_wheel.py)
rm -rf "$RUN_DIR"
