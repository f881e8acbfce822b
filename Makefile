# Two commands do all the set-up: `make serve` (set up + serve the embedded model) and `make test`.
# Both create/reuse .venv (a Python >= 3.12 is found automatically; see scripts/setup_env.sh).
PY := .venv/bin/python
ARGS ?=
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: setup serve generate lint test test-fast bench client
setup:
	@bash scripts/setup_env.sh

serve: setup
	$(PY) -m engine.server $(ARGS)

generate: setup
	$(PY) -m engine.generate_cli --chat --prompt "$(PROMPT)" $(ARGS)

client: setup
	$(PY) scripts/client.py --chat "$(PROMPT)" $(ARGS)

# ruff (configured in pyproject.toml) runs before the tests: a lint error fails `make test` and CI.
lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/benchmark.py $(ARGS)
