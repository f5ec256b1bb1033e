# Fresh-machine entry points: `make demo` (train, export, serve, query) and `make test`.
# Installs come from requirements.lock (every resolved version, with hashes); `make lock`
# refreshes it, `make test-latest` tries the newest versions pyproject.toml allows.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
LOCK := requirements.lock
PIP_COMPILE_FLAGS := --generate-hashes --extra dev --strip-extras --unsafe-package torch \
	-c constraints.txt --no-emit-index-url --no-emit-find-links

.PHONY: setup services demo test test-fast test-latest lock bench lint clean

setup: $(STAMP)

# torch first (CPU build, pinned; the lock leaves it out so a GPU image can bring its own
# CUDA build), then exactly the locked versions, then fintwin itself without resolving anything.
$(STAMP): pyproject.toml constraints.txt $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "pip==$$(sed -n 's/^pip==\([^ ]*\).*/\1/p' $(LOCK))"
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

# Real servers the tests start on loopback: Debian's redis-server (live twins' state store)
# and prometheus (scraping the embedded Triton's metrics).
services:
	@{ command -v redis-server && command -v prometheus; } >/dev/null || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus; }

lock: $(STAMP)
	$(BIN)/pip-compile $(PIP_COMPILE_FLAGS) -o $(LOCK) pyproject.toml

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP) services
	$(BIN)/pytest -q

test-fast: $(STAMP) services
	$(BIN)/pytest -q -m "not slow"

test-latest:
	bash .ci/latest

bench: $(STAMP)
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/rollout.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile.cuda

clean:
	rm -rf $(VENV) .venv-latest outputs multirun .pytest_cache
