# The README's commands. Each one sets up .venv itself (scripts/setup.sh).
.PHONY: setup demo test test-slow bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lowbit demo

test: setup
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/python -m pytest -m "not slow" -q

test-slow: setup  # exit 5 = no test is marked slow yet: not a failure
	.venv/bin/python -m pytest -m slow -q || [ $$? -eq 5 ]

bench: setup
	mkdir -p results
	.venv/bin/python benchmarks/granularity.py --json-out results/granularity.json
