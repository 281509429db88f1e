# Two commands do all set-up on a fresh machine: `make demo` (main job) and `make test`.
# Set-up installs requirements/lock.txt (every dependency at the exact version the suite last passed with,
# with hashes); pyproject.toml keeps ranges. `make lock` re-resolves the lock, `make test-latest` runs the
# suite against the newest releases pyproject.toml allows (in .venv-latest), so upgrades are deliberate.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) requirements/uv.txt | sha1sum | cut -c1-12)
# torch's CPU build lies here on the CI machine kind; elsewhere uv looks on PyPI only (README, "Installing it elsewhere")
FIND_LINKS := $(wildcard /opt/wheels)
UV_LINKS = --quiet $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: demo test test-fast test-latest lock bench clean browser

$(STAMP): pyproject.toml $(LOCK) requirements/uv.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/uv.txt
	$(BIN)/uv pip sync $(UV_LINKS) --python $(BIN)/python --require-hashes $(LOCK)
	$(BIN)/uv pip install $(UV_LINKS) --python $(BIN)/python --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(BIN)/workbench demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=20

# the edit-test loop: tiny models only; no SmolLM2, browser, notebook, subprocess or Ray test (tests/conftest.py)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lock: $(STAMP)
	$(BIN)/uv pip compile $(UV_LINKS) --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --custom-compile-command "make lock" \
	  --upgrade --extra dev pyproject.toml requirements/lock.in -o $(LOCK)
	$(BIN)/uv pip compile $(UV_LINKS) --generate-hashes --custom-compile-command "make lock" --upgrade requirements/uv.in -o requirements/uv.txt

NORMALISE = awk -F'==' '{n = tolower($$1); gsub(/[_.]/, "-", n); print n "==" $$2}' | sort
# the newest releases pyproject.toml allows (torch stays the CPU build of the lock: see requirements/lock.in)
test-latest: $(STAMP) browser
	test -x $(VENV)-latest/bin/python || $(PY) -m venv $(VENV)-latest
	$(VENV)-latest/bin/python -m pip install -q --require-hashes --no-deps -r requirements/uv.txt  # the wheel test uses it
	$(BIN)/uv pip install $(UV_LINKS) --python $(VENV)-latest/bin/python \
	  --upgrade --reinstall-package interp-workbench "torch==2.13.0+cpu" -e ".[dev]"
	@echo "what differs from the lock (< lock, > newest):"
	@diff <(grep '==' $(LOCK) | sed 's/ .*//' | $(NORMALISE)) \
	  <($(VENV)-latest/bin/python -m pip list --format=freeze | grep -v '^interp-workbench\|^pip==' | $(NORMALISE)) || true
	$(VENV)-latest/bin/python -m pytest -q

# Debian's chromium for the browser tests and PNG export (kaleido finds it on PATH); never `playwright install`
browser:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

bench: $(STAMP)
	$(BIN)/python benchmarks/attention_capture.py

clean:
	rm -rf $(VENV) $(VENV)-latest .pytest_cache
