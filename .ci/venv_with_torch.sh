#!/usr/bin/env bash
# Make a venv that imports torch from the shared torch venv instead of installing its own copy.
#
#   .ci/venv_with_torch.sh PYTHON TORCH_ENV DIR
#
# torch with its CUDA libraries is about 6 GB; CI builds five venvs (test, bare, wheel, oldest, clients), and five
# copies do not fit on its disk. TORCH_ENV (built by the Makefile, holding only the pinned torch and torchvision)
# is appended to DIR's sys.path by a .pth file, so pip in DIR sees torch as installed and Python imports it; DIR's
# own site-packages still comes first, so anything DIR installs itself wins. The `torchrun` launcher, which lives
# in TORCH_ENV's bin, gets a twin in DIR's bin that runs with DIR's Python (so the ranks see DIR's packages).
set -euo pipefail
PYTHON=$1
TORCH_ENV=$(cd "$2" && pwd)
DIR=$3
"$PYTHON" -m venv "$DIR"
purelib() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
purelib "$TORCH_ENV" > "$(purelib "$DIR")/_slq_hf_shared_torch.pth"
DIR_PY=$(cd "$DIR/bin" && pwd)/python
printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' "$DIR_PY" > "$DIR/bin/torchrun"
chmod +x "$DIR/bin/torchrun"
"$DIR/bin/pip" install --quiet --upgrade pip
"$DIR/bin/python" -c "import torch, torchvision" || { echo "$DIR: torch from $TORCH_ENV does not import" >&2; exit 1; }
