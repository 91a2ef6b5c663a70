# `make demo` and `make test` bootstrap .venv idempotently (re-installed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Local wheels of this CUDA build run on the CPU; a user with another torch keeps theirs (pyproject has ranges).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/roadwork demo --run runs/demo

test: $(STAMP)
	$(BIN)/ruff check roadwork_cli tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check roadwork_cli tests benchmarks
	$(BIN)/ruff format --check roadwork_cli tests benchmarks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_cache_features.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_train_cached.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_predict.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/synthetic_probe.py
	# Head vs a logistic-regression probe on the same cached features; exits 1 while some cell loses.
	-HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/head_vs_probe.py --jobs 2 --out runs/bench/head_vs_probe.json
	# The table of benchmarks/RESULTS.md: bare forward, bf16 verdict, then end-to-end paths measured beside them.
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_forward.py --out runs/bench/forward.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_precision.py --out runs/bench/precision.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_predict.py --onnx-out runs/bench/onnx.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_streams.py --out runs/bench/streams.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/write_results.py --bench-dir runs/bench --out benchmarks/RESULTS.md

clean:
	rm -rf runs .pytest_cache
