# cliprail: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH  := $(VENV)/.installed-bench

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,atari]'
	touch $(STAMP)

# The peers (Stable-Baselines3, TRL) only for the benchmarks: tests never import them.
$(BENCH): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,atari,bench]'
	touch $(BENCH)

lint: $(STAMP)
	$(BIN)/ruff check cliprail tests benchmarks examples
	$(BIN)/ruff format --check cliprail tests benchmarks examples
	$(BIN)/mypy cliprail

test: lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/cliprail demo

bench: $(BENCH)
	$(BIN)/python benchmarks/rl_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
