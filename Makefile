# trackb — see README.md. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRACKB := $(VENV)/bin/trackb
RUN_ID ?= demo
CONFIG ?= jobs/configs/demo.yaml
# Nothing may come from a model hub: the demo builds its own tiny model.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench clean help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch for development and CI; the GPU images pin their own builds.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed ## Create .venv with trackb and its pinned dependencies

demo: install ## Run the whole pipeline on CPU (verl corpus, reference teacher, tiny model)
	$(TRACKB) run-all --config $(CONFIG) --run-id $(RUN_ID)

test: install ## Run the test suite (unit + integration; CPU only)
	$(PY) -m pytest

test-fast: install ## Unit tests only (skips integration and slow)
	$(PY) -m pytest -m "not integration and not slow"

lint: install ## ruff over the code and tests
	$(VENV)/bin/ruff check trackb_core jobs tests benchmarks

bench: install ## Benchmarks: print measured ratios against a baseline run in-process
	$(PY) -m benchmarks

clean: ## Remove the venv and local runs
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
