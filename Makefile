# The two README commands: `make run` (set up + the default job) and `make test`.
BUDGET ?= 10m
ARGS ?=

.PHONY: install run test test-all bench-engine results clean

install: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $@

run: install
	.venv/bin/bench run --budget $(BUDGET) $(ARGS)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -m "not gpu and not postgres"

bench-engine: install
	.venv/bin/python -m bench.cost.perf engine --json

# Canonical shapes results (docs/results/*.pdf) from one clean commit; settings in scripts/results.sh
results: install
	bash scripts/results.sh

clean:
	rm -rf .venv runs
