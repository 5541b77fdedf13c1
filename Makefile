# EventLive Edge. On a fresh machine: `make run` or `make test` (each creates .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: run test lint check wheel bench bench-passthrough clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m gateway --config $(CONFIG)

check: $(STAMP)
	$(BIN)/python -m gateway check --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway
	$(BIN)/mypy

# The same wheel step the Dockerfile's builder stage runs.
wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --wheel-dir dist .

# Benchmarks need nginx and wrk (Debian: apt-get install nginx-light wrk); without them
# bench/passthrough.py says so and exits non-zero.
bench-passthrough: $(STAMP)
	$(BIN)/python bench/passthrough.py

# S1-S3 quick scenarios (each < 90 s): need PostgreSQL (BENCH_PG_DSN, default
# postgresql://postgres@127.0.0.1:5432/test) and Redis (BENCH_REDIS_URL, default db 8);
# write bench/results/s{1,2,3}-quick.{json,md,png}. See docs/scenarios.md.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: bench-passthrough $(BENCH_STAMP)
	$(BIN)/python -m bench all --quick --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
