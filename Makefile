# relman: every target sets up what it needs, so `make run` and `make test`
# work on a fresh clone with only Python 3.11+ installed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PROTOS := $(wildcard protos/relman/v1/*.proto)
GENERATED := relman/v1/.generated

.PHONY: install migrate seed test test-slow soak lint protos run bench bench-scale clean

install: $(STAMP)

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Generated code lands in relman/v1/ (imported as relman.v1.*); never edited, never committed.
protos: $(GENERATED)

$(GENERATED): $(PROTOS) $(STAMP)
	rm -rf relman
	mkdir -p relman/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch relman/__init__.py relman/v1/__init__.py $(GENERATED)

# As the schema's owner (MIGRATION_DATABASE_URL), then grants the services' role.
migrate: install
	$(PY) -m shared.persistence.schema

seed: migrate
	$(PY) -m shared.devtools.seed

# Embedded PostgreSQL unless DATABASE_URL is set; migrate, seed once, serve until Ctrl-C.
run: protos
	$(PY) -m shared.devtools.run

# The fault suite and the bench's end-to-end runs: minutes each on two cores, so `make test`
# leaves them to `make test-slow` (.ci/run runs both).
SLOW_TESTS := tests/faults tests/test_bench.py

test: protos
	$(PY) -m pytest $(foreach path,$(SLOW_TESTS),--ignore=$(path)) $(PYTEST_ARGS)

test-slow: protos
	$(PY) -m pytest $(SLOW_TESTS) $(PYTEST_ARGS)

# The fault suite with the database stopped and started RESTARTS times under load (default 20).
soak: protos
	FAULT_RESTARTS=$(or $(RESTARTS),20) $(PY) -m pytest tests/faults $(PYTEST_ARGS)

lint: protos
	cd protos && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every scenario against a baseline measured in the same run; QUICK=1: small sizes, under a minute.
# COMPARE=<git ref>: only the lifecycle and LogAction scenarios, for this tree and a scratch
# checkout of the ref, taking turns ROUNDS times (default 2) on one PostgreSQL server; prints
# both and this tree's over the ref's, writes bench/results-compare.json.
bench: protos
	$(PY) -m bench $(if $(QUICK),--quick) $(if $(COMPARE),--compare $(COMPARE)) $(if $(ROUNDS),--rounds $(ROUNDS))

# The audit trail at scale: 10,000,000 rows over 12 monthly partitions, loaded as the owner
# (several minutes); SCALE_ROWS=N: fewer rows; QUICK=1: short loads. Writes bench/results-scale.json.
bench-scale: protos
	$(PY) -m bench.scale $(if $(QUICK),--quick) $(if $(SCALE_ROWS),--rows $(SCALE_ROWS))

clean:
	rm -rf $(VENV) .data .pytest_cache relman
