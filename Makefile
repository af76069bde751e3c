# `make run`: set up and run the whole pipeline on Fashion-MNIST.
# `make test`: set up and run the test suite.
.PHONY: run test setup bench clean-venv

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/ensure_data.sh
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true dvc repro

test: setup
	@. .venv/bin/activate && MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true python -m pytest $(PYTEST_ARGS)

bench: setup
	@. .venv/bin/activate && python benchmarks/run_all.py $(BENCH_ARGS)
