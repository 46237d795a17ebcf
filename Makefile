# The two commands of README.md: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) recipes/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
