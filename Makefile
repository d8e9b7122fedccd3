# devicegate: `make demo` runs it end to end, `make test` runs the whole suite.
# Both create .venv and install the project into it when pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench fuzz services schemas clean

FUZZ_SECONDS ?= 60

$(STAMP): pyproject.toml gateway/events/_codec.c gateway/_tlsext.c
	@bash scripts/ensure-build-tools.sh $(PYTHON)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

services:
	@bash scripts/ensure-services.sh

demo: $(STAMP) services
	$(BIN)/devicegate demo

test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway provisioning schemas tests bench fuzz
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway provisioning schemas fuzz

bench: $(STAMP) services
	@for bench in bench/*.py; do echo "== $$bench"; $(BIN)/python $$bench || exit 1; done

fuzz: $(STAMP)
	bash fuzz/run.sh $(FUZZ_SECONDS)

schemas: $(STAMP)
	$(BIN)/python -m schemas.jsonschema

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
