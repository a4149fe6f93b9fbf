# relman: every target sets up what it needs, so `make run` and `make test`
# work on a fresh clone with only Python 3.11+ installed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install migrate seed test lint protos run bench clean

install: $(STAMP)

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

migrate: install
	$(PY) -m alembic upgrade head

seed: migrate
	$(PY) -m shared.seed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# Filled by later issues: code generation, both servers, benchmark.
protos run bench: install
	@echo "make $@: not built yet" >&2; exit 2

clean:
	rm -rf $(VENV) .data .pytest_cache
