# Two entry points: `make demo` and `make test` (each creates .venv first if needed).
PYTHON ?= python3
VENV ?= .venv
# This machine has a CPU wheel of torch 2.13.0 on disk; elsewhere override, e.g. TORCH_SPEC='torch>=2.2'.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

$(BIN)/ebrflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/ebrflow

demo: venv
	$(BIN)/ebrflow demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: venv
	$(BIN)/python -m bench.gowalla && $(BIN)/python -m bench.streaming

clean:
	rm -rf $(VENV) ebrflow_data
