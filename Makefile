# The two README commands: `make run` (set up + the default job) and `make test`.
BUDGET ?= 10m
ARGS ?=

.PHONY: install run test test-numerics test-dist test-slow test-all bench-engine results results-rivals results-kd clean

install: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $@

run: install
	.venv/bin/bench run --budget $(BUDGET) $(ARGS)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q

# the golden and parity tests again under perturbed float32 rounding (other CPU kernels and thread counts, as on
# another machine); .ci/run runs it after `make test`
test-numerics: install
	PYTHON=.venv/bin/python bash tests/perturbed_rounding.sh

# the fast 2-process DDP and FSDP runs (accelerate launch, gloo on CPU): kill, resume, records identical to an
# uninterrupted run; budgets counted once (marker multiproc, not in `make test`); .ci/run runs it after test-numerics.
# Named by file: collecting the whole suite to find them would cost more than a third of their run time
test-dist: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -n 0 -m "multiproc and not slow" tests/test_multiproc.py

# the end-to-end variants behind the default suite's fast representatives (marker slow; .ci/run runs it last),
# two test processes as in the default run
test-slow: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -m "slow and not gpu and not postgres and not multiproc"

test-all: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -n 0 -m "not gpu and not postgres"

bench-engine: install
	.venv/bin/python -m bench.cost.perf engine --json

# Canonical shapes results (docs/results/) from one clean commit; settings in scripts/results.sh, choices in
# docs/REPORTS.md: the four seed algorithms with tuning and controls ...
results: install
	bash scripts/results.sh main

# ... the rivals under the same protocol (tuned arms and controls) ...
results-rivals: install
	bash scripts/results.sh rivals

# ... and the TreeGRPO k x d grid at TreeGRPO's tuned learning rate
results-kd: install
	bash scripts/results.sh kd

clean:
	rm -rf .venv runs
