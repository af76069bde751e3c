# `make run`: set up and run the whole pipeline on Fashion-MNIST.
# `make test`: set up and run the test suite.
.PHONY: run test setup bench clean-venv

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/ensure_data.sh
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true dvc repro

# Tests run in parallel, a test file per worker (its module fixtures are built once),
# one worker more than the machine has cores: much of the suite waits on dvc and
# mlflow subprocesses, queue polls and servers (one worker per core kept 2 cores
# only 65% busy), and the extra worker runs tests in those waits.
# Files go to workers longest first (their `long(seconds)` marks, tests/conftest.py): xdist's
# default reorder by test count would start the one-test README file last.
# PYTEST_WORKERS=0 runs them in this process (one test, a debugger).
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: setup
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: setup
	@. .venv/bin/activate && python benchmarks/run_all.py $(BENCH_ARGS)
