# The two commands of README.md: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: setup demo demo-real test lint docs
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) demos/demo.py

# the DPO paper's sentiment experiment on SmolLM2-135M-Instruct, judged by VADER (~27 min;
# DEMO_ARGS=--full for the frontier, reruns reuse finished stages)
demo-real: setup
	$(PY) demos/demo_real.py $(DEMO_ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

# the documentation site: a strict build, then served on 127.0.0.1 (DOCS_PORT, default 8000)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:$(or $(DOCS_PORT),8000)
