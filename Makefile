# The two commands a new machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-test demo test lint bench clean

# The runtime only (what the images install).
install:
	@bash scripts/install.sh

# The runtime plus pyproject's `test` extra.
install-test:
	@bash scripts/install.sh --test

demo: install
	@bash scripts/demo.sh

# Lint and the import contracts (pyproject's [tool.importlinter]) first: they take seconds, the suite minutes.
lint: install-test
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

test: lint
	@bash scripts/install_browser.sh
	@bash scripts/install_postgres.sh
	$(PY) -m pytest

bench: install
	$(PY) bench/train_bench.py
	$(PY) bench/train_bench.py --packing
	$(PY) bench/serve_bench.py
	$(PY) bench/guard_bench.py
	$(PY) -m bench.data_bench
	$(PY) -m bench.distributed_bench
	$(PY) -m bench.estimate_bench
	$(PY) -m bench.load_bench

clean:
	rm -rf runs adapters .pytest_cache
