# Two commands a newcomer types: `make demo` and `make test`. Both build .venv from nothing but Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch pinned: on these machines the pinned CUDA build installs from local files (and runs on CPU); torchvision is
# needed by the Qwen-VL image processors. It is installed once, in .venv-torch, and every venv below sees it through a
# .pth file (.ci/venv_with_torch.sh): one copy is ~6 GB, and CI builds five venvs.
TORCH  := torch==2.14.1 torchvision==0.29.1
TORCH_ENV   := .venv-torch
TORCH_STAMP := $(TORCH_ENV)/.installed-stamp
NEW_VENV    := .ci/venv_with_torch.sh $(PYTHON) $(TORCH_ENV)

.PHONY: install demo test test-all test-oldest test-clients wheel-smoke lint bench check-repo clean

$(TORCH_STAMP):
	$(PYTHON) -m venv $(TORCH_ENV)
	$(TORCH_ENV)/bin/pip install --quiet --upgrade pip
	$(TORCH_ENV)/bin/pip install --quiet $(TORCH)
	touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(NEW_VENV) $(VENV)
	$(BIN)/pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-all: install
	$(BIN)/python -m pytest -m "" -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/run_all.py

# Every slq_hf module must import with only the core dependencies (optional ones are guarded): a bare venv without
# the extras (no sentence-transformers, bitsandbytes, peft, datasets, accelerate, matplotlib) imports them all.
BARE := .venv-bare
check-repo: $(TORCH_STAMP)
	rm -rf $(BARE)
	$(NEW_VENV) $(BARE)
	$(BARE)/bin/pip install --quiet -e .
	$(BARE)/bin/python -c "import importlib, pkgutil, slq_hf; \
	[importlib.import_module(m.name) for m in pkgutil.walk_packages(slq_hf.__path__, 'slq_hf.')]; \
	from slq_hf.cli import main; main(['--help'])" > /dev/null
	@echo "check-repo: every slq_hf module imports with core dependencies only"

# The oldest transformers and sentence-transformers pyproject.toml allows (its `>=` floors, read by .ci/oldest_pins.py),
# in a venv of their own: the offline suite must pass there too, or the floors must go up.
OLDEST_VENV := .venv-oldest
OLDEST_PINS  = $(shell $(PYTHON) .ci/oldest_pins.py transformers sentence-transformers)
test-oldest: $(TORCH_STAMP)
	rm -rf $(OLDEST_VENV)
	$(NEW_VENV) $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet -e ".[all]" $(OLDEST_PINS)
	$(OLDEST_VENV)/bin/python -c "import transformers, sentence_transformers as st; \
	print('test-oldest: transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -n 2 --dist loadfile

# LangChain and LlamaIndex through sentence-transformers (tests/test_clients.py). Their own venv: langchain-huggingface
# caps huggingface-hub below 2, which the main venv should not inherit.
CLIENTS_VENV := .venv-clients
test-clients: $(TORCH_STAMP)
	rm -rf $(CLIENTS_VENV)
	$(NEW_VENV) $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install --quiet -e ".[sentence-transformers,dev,clients]"
	$(CLIENTS_VENV)/bin/python -m pytest tests/test_clients.py

# Build the wheel, install it (not editable) in a fresh venv, run tests/smoke_wheel.py outside the checkout.
wheel-smoke: $(TORCH_STAMP)
	.ci/wheel_smoke.sh $(PYTHON) $(TORCH_ENV)

clean:
	rm -rf $(VENV) $(TORCH_ENV) $(BARE) $(OLDEST_VENV) $(CLIENTS_VENV) .venv-wheel .pytest_cache build *.egg-info
