# The README's commands. Each one sets up .venv itself (scripts/setup.sh).
.PHONY: setup demo test test-slow bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lowbit demo

test: setup
	.venv/bin/python -m pytest -m "not slow" -q

test-slow: setup
	.venv/bin/python -m pytest -m slow -q

bench: setup
	.venv/bin/python benchmarks/granularity.py --json-out results/granularity.json
