# Two commands a newcomer types: `make demo` and `make test`. Both build .venv from nothing but Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch first and pinned: on these machines the pinned CUDA build installs from local files (and runs on CPU);
# torchvision is needed by the Qwen-VL image processors.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint bench check-repo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
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

# `import slq_hf` must work with only the core dependencies (optional imports guarded).
check-repo: install
	$(BIN)/python -c "import slq_hf, slq_hf.modeling, slq_hf.processing"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
