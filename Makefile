# `make run`: set up and run the whole pipeline on Fashion-MNIST.
# `make test`: set up and run the test suite.
.PHONY: run test setup bench clean-venv

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/ensure_data.sh
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true dvc repro

# Tests run in parallel, a test file per worker (its module fixtures are built once):
# most of the suite waits on dvc/mlflow subprocesses, so 2 workers fill 2 cores.
# PYTEST_WORKERS=0 runs them in this process (one test, a debugger).
PYTEST_WORKERS ?= auto
test: setup
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	@. .venv/bin/activate && python benchmarks/run_all.py $(BENCH_ARGS)
