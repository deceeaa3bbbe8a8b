# cliprail: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH  := $(VENV)/.installed-bench
# Let Python cache the bytecode of what it imports (some machines set PYTHONDONTWRITEBYTECODE,
# and then every test subprocess would recompile torch's and transformers' modules)
PY     := env -u PYTHONDONTWRITEBYTECODE

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-compile: Python compiles what is imported on first use and caches it (PY below);
	# byte-compiling all of torch and transformers up front took 80 of the 120 s of an install
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,atari]'
	touch $(STAMP)

# The peers (Stable-Baselines3, TRL) only for the benchmarks: tests never import them.
$(BENCH): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,atari,bench]'
	touch $(BENCH)

lint: $(STAMP)
	$(BIN)/ruff check cliprail tests benchmarks examples
	$(BIN)/ruff format --check cliprail tests benchmarks examples
	$(BIN)/mypy cliprail

test: lint
	$(PY) $(BIN)/pytest -q

demo: $(STAMP)
	$(PY) $(BIN)/cliprail demo

bench: $(BENCH)
	$(PY) $(BIN)/python benchmarks/rl_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
