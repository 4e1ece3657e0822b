# Two entry points: `make demo` and `make test` (each creates .venv first if needed).
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, alone (--no-deps; its dependencies come with the project's), with the CPU wheel index
# added to pip's own indexes: a release's "+cpu" build sorts above PyPI's CUDA build, so no multi-GB CUDA download,
# and wheels pip already finds (a local find-links directory, as on the machine this was developed on) still work.
# Override: TORCH_SPEC='torch>=2.2', TORCH_INDEX=https://download.pytorch.org/whl/cu124, or TORCH_INDEX= (pip's only).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
# `make bench` runs every suite in bench/ (hours on 2 cores; choose with BENCH_SUITES="quality throughput"), then
# renders every results page from bench/results/*.json (python -m bench.report): each suite's .md, RESULTS.md and the
# results blocks of docs/benchmarks.md and docs/scaling.md; gowalla only when its data sit beside the checkout.
GOWALLA_DATA ?= ../shared/data/lightgcn-gowalla
BENCH_SUITES ?= quality throughput freshness scale soak task_cost variants ranks $(if $(wildcard $(GOWALLA_DATA)),gowalla)

.PHONY: venv demo test lint bench clean

$(BIN)/ebrflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[train,test]"
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
	@set -e; for suite in $(BENCH_SUITES); do echo "== python -m bench.$$suite"; $(BIN)/python -m bench.$$suite; done
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) ebrflow_data
