# The two commands: `make run` (the whole stack on embedded defaults) and `make test`.
# Needs only Python 3.11+ and GNU make; everything else goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

# DATABASE_URL and REDIS_URL pass through from the environment (make exports what it inherited):
# set, the tests and `make run` use those stores; unset, an embedded Redis and SQLite.

.PHONY: run test clean venv bench lint

run: $(STAMP)
	exec $(BIN)/inventory run

test: $(STAMP)
	@rc=0; $(BIN)/python -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# ruff (pinned in the test extras) with the short rule set of ruff.toml.
lint: $(STAMP)
	$(BIN)/ruff check --output-format concise .

# The engine, expiry, reconcile, checkout and job tests again on a 3-primary Redis Cluster that the
# fixtures start on loopback ports (the rest of the suite needs no second run).
CLUSTER_TESTS := tests/lua tests/integration/test_engine_concurrency.py tests/integration/test_expiry.py \
	tests/integration/test_reconcile.py tests/api/test_cart.py tests/api/test_bundle.py tests/jobs
.PHONY: test-cluster
test-cluster: $(STAMP)
	@rc=0; $(BIN)/python -m pytest -q --redis-cluster $(CLUSTER_TESTS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-cluster: pytest collected no tests" >&2; fi; \
	exit $$rc

# `make bench` (about 5 minutes) or `make bench QUICK=1` (under 2): see bench/README.md.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(if $(filter 1,$(QUICK)),--quick)

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package definition changed since the last install.
$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

$(BENCH_STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	@touch $@

clean:
	rm -rf var .pytest_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# `make soak MINUTES=10`: mixed load from several processes with the invariant checked every second
# and the order ledger at the end; prints the operations done and the violations (must be 0).
MINUTES ?= 10
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $(MINUTES)
