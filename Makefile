# Two commands do all the set-up on a fresh machine (Python 3.11, no system ffmpeg needed):
#   make demo   create .venv, install, run the embedded demo pipeline on CPU
#   make test   create .venv, install with dev extras, run the test suite
# TORCH_SPEC picks the torch build; the default is a CPU wheel. GPU users: make TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# optional: OpenAI's dall_e package, only to test the DALL-E importer (no deps: it would pull torchvision)
	$(BIN)/python -m pip install -q --no-deps "dall-e==0.1" attrs requests urllib3 idna charset-normalizer certifi || echo "dall-e not installed: its import test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vimpac run demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks --scale small

clean:
	rm -rf $(VENV) .pytest_cache
