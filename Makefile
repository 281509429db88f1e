# Two commands do all set-up on a fresh machine: `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt | sha1sum | cut -c1-12)

.PHONY: demo test bench clean browser

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a looser requirement pulls gigabytes of CUDA wheels on a CPU machine
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(BIN)/workbench demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Debian's chromium for the browser tests and PNG export (kaleido finds it on PATH); never `playwright install`
browser:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

bench: $(STAMP)
	$(BIN)/python benchmarks/attention_capture.py

clean:
	rm -rf $(VENV) .pytest_cache
