# The two commands a new machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

test: install
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
