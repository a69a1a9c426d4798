# socket-echo: `make run` starts the server, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
DURATION ?= 60
FUZZ_SECONDS ?= 300

.PHONY: install run test lint bench soak fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/socket-echo serve $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Tests wait on sockets and timers more than on the CPU: 4 runners on 2 cores.
test: lint
	$(BIN)/pytest -n 4 --cov=socket_echo --cov-report=term:skip-covered $(ARGS)

bench: install
	$(BIN)/python benchmarks/run.py $(ARGS)

# Mixed traffic for DURATION seconds; fails on a wrong byte or growth after warm-up.
soak: install
	$(BIN)/python tests/soak.py --duration $(DURATION) --json soak-result.json

# The PROXY header parser under libFuzzer for FUZZ_SECONDS; the corpus persists.
fuzz: install
	$(BIN)/python tests/fuzz_proxy.py --write-seeds .fuzz-corpus
	$(BIN)/python tests/fuzz_proxy.py .fuzz-corpus -max_total_time=$(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .fuzz-corpus soak-result.json src/*.egg-info .pytest_cache .mypy_cache .ruff_cache benchmarks/build
