# Every target runs inside .venv, which `make setup` creates from pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-packages demo test bench clean

setup: $(STAMP) system-packages

# tmux drives the live `labelstream top` test, headless Chromium the eval report
# test. Sessions and CI run as root on Debian; elsewhere install them yourself.
system-packages:
	@command -v tmux >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq tmux >/dev/null)
	@test -x /usr/bin/chromedriver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/labelstream demo

test: setup
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# One table, every comparison side by side; exits 1 when a target is missed by more
# than the measured noise. BENCH_ARGS="--only dedupe" runs one row, "--quick" a smoke run.
bench: setup
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
