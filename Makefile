# socket-echo: `make run` starts the server, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
DURATION ?= 60
FUZZ_SECONDS ?= 300

# Every test starts servers and tools as processes (several hundred of each): with
# PYTHONDONTWRITEBYTECODE set (as some shells and CI images do), each of them compiled the
# package's sources again, ~40 % of its start-up CPU, and pytest rewrote every test module's
# asserts again in each runner. The bytecode is kept in __pycache__ (ignored by git).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run test lint coverage packaging board sanitize sanitize-thread bench soak fuzz clean

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

# Tests wait on sockets and timers as much as on the CPU: 6 runners on 2 cores, each taking
# the next test when it is free (worksteal: no runner idles behind a long one); the ten
# slowest are printed. No coverage here (tracing doubles the in-process tests' CPU; `make
# coverage` is the full figure). Then the native data path's tests again, with the extension
# built under ASan and UBSan, then TSan.
test: lint
	$(BIN)/pytest -n 6 --dist worksteal --durations=10 -m "not packaging and not board and not multicast" \
		$(ARGS)
	$(MAKE) packaging
	$(MAKE) board
	$(MAKE) sanitize
	$(MAKE) sanitize-thread

# The Dockerfile's pip steps in a fresh virtual environment (wheels compiled, installed from
# them alone, served from): a gate of its own, by marker, that says how many cases it ran.
packaging: install
	@n=$$($(BIN)/pytest -q --collect-only -p no:cacheprovider -m packaging tests | grep -c '::'); \
		echo "packaging: $$n cases"; test $$n -ge 1 || { echo "packaging: no case"; exit 1; }
	$(BIN)/pytest -p no:cacheprovider -m packaging tests

# Line coverage including the servers and tools the tests run as subprocesses (slower: every
# process starts coverage).
coverage: install
	$(BIN)/pytest -n 4 --cov=socket_echo --cov-config=tests/coverage-subprocess.toml \
		--cov-report=term:skip-covered $(ARGS)

# Each sanitizer gate selects its cases by the ``native`` marker (tests/conftest.py), says how
# many native cases outside test_native_* it runs, and fails below its floor: a selection by
# substring of ids once ran none ("uvloop-native" contains "loop") and still passed.
native_count = @n=$$($(BIN)/pytest -q --collect-only -p no:cacheprovider -m native $(1) \
	| grep '::' | grep -vc 'test_native_'); echo "$(2): $$n native cases outside test_native_*"; \
	test $$n -ge $(3) || { echo "$(2): fewer than $(3) native cases"; exit 1; }

# The tests in network namespaces they make: the tools against an embedded TCP/IP stack
# (tests/test_board.py: the seed's loop over lwIP on a TAP device) and a multicast segment of
# responders (tests/test_multicast.py). They need root, /dev/net/tun and liblwip-dev:
# elsewhere they skip, and this gate says how many ran; in CI (CI set) it fails when fewer
# than all of them ran.
BOARD_CASES := 15
board: install
	@out=$$($(BIN)/pytest -p no:cacheprovider -m "board or multicast" -rs tests/test_board.py \
		tests/test_multicast.py 2>&1); \
		echo "$$out" | tail -4; \
		n=$$(echo "$$out" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true); \
		echo "board: $${n:-0} cases ran in network namespaces (lwIP board, multicast segment)"; \
		if echo "$$out" | grep -qE '[0-9]+ (failed|error)'; then exit 1; fi; \
		if [ -n "$$CI" ] && [ "$${n:-0}" -lt $(BOARD_CASES) ]; then \
			echo "board: fewer than $(BOARD_CASES) cases ran in CI"; exit 1; fi

# The native extension built with -fsanitize=address,undefined (a copy of src/ in build/asan),
# and the tests that drive it with hostile or odd peers run against that build.
ASAN_DIR := build/asan
SANITIZED_TESTS := tests/test_echo.py tests/test_flow_control.py tests/test_half_close.py \
	tests/test_abuse.py tests/test_faults.py tests/test_shutdown.py tests/test_idle_timeout.py \
	tests/test_descriptors.py tests/test_max_connections.py tests/test_unix.py tests/test_udp.py \
	tests/test_bench.py tests/test_bench_tls.py tests/test_native_unlisted.py \
	tests/test_native_engine.py \
	tests/test_close_reasons.py tests/test_distributed.py
SANITIZED = ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	PYTHONPATH=$(ASAN_DIR)/src
sanitize: install
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r src setup.py pyproject.toml README.md $(ASAN_DIR)/
	cd $(ASAN_DIR) && SOCKET_ECHO_SANITIZE=1 $(CURDIR)/$(BIN)/python setup.py -q build_ext --inplace
	$(SANITIZED) $(BIN)/python -c "import socket_echo.tcp._native as n; \
		assert '$(ASAN_DIR)' in n.__file__, n.__file__"
	$(call native_count,$(SANITIZED_TESTS),sanitize (ASan/UBSan),25)
	$(SANITIZED) $(BIN)/pytest -n 4 -p no:cacheprovider -m native $(SANITIZED_TESTS)

# The TCP engine's thread and the event loop's calls into it, built with -fsanitize=thread:
# the tests that make the two meet (closes racing Python's calls, descriptors reused, the
# drain, the cap) fail on any data race.
TSAN_DIR := build/tsan
THREAD_SANITIZED_TESTS := tests/test_native_engine.py tests/test_native_unlisted.py \
	tests/test_shutdown.py tests/test_max_connections.py tests/test_idle_timeout.py \
	tests/test_echo.py tests/test_half_close.py
sanitize-thread: install
	rm -rf $(TSAN_DIR) && mkdir -p $(TSAN_DIR)
	cp -r src setup.py pyproject.toml README.md $(TSAN_DIR)/
	cd $(TSAN_DIR) && SOCKET_ECHO_SANITIZE=thread $(CURDIR)/$(BIN)/python setup.py -q build_ext --inplace
	TSAN_OPTIONS=halt_on_error=1 LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
		PYTHONPATH=$(TSAN_DIR)/src $(BIN)/pytest -n 4 -p no:cacheprovider -m native \
		$(THREAD_SANITIZED_TESTS)
	$(call native_count,$(THREAD_SANITIZED_TESTS),sanitize-thread (TSan),10)

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
