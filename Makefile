# Two entry points: `make run` (a short load simulation) and `make test`.
# Both create .venv and install what they need on a machine with only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check bench bench-audit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat: a plain path entry for the checkout instead of an import hook, so that static
	# tools (mypy on a user's program) find `bank` in this venv; see README "Install".
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,simulate]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	rm -f run-ledger.db run-ledger.db-wal run-ledger.db-shm run-result.json run-result.png
	$(BIN)/bank simulate --db run-ledger.db --ops 20000 --tellers 16 --seed 1 --json run-result.json --plot run-result.png

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check bank tests scripts migrations
	$(BIN)/ruff format --check bank tests scripts migrations

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

bench-audit: $(STAMP)
	$(BIN)/python scripts/bench_audit.py

clean:
	rm -rf $(VENV) build *.egg-info run-ledger.db* run-result.json
