# mcis-dist: `make demo` and `make test` are all a new user types; both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Re-install only when the dependency list changes (idempotent `make setup`).
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
BENCH_ARGS  ?=

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(VENV)/bin/mcis demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite, slow multi-process tests included (what CI runs).
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Quick loop while developing: everything but the slow multi-process tests.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/[a-z]*.py; do \
		case $$b in */common.py) continue;; esac; \
		echo "== $$b"; $(PY) $$b $(BENCH_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache benchmarks/results shards/built runs
