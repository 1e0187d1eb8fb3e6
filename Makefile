# The README's commands. Each one sets up .venv itself (scripts/setup.sh).
.PHONY: setup demo test test-slow bench llama-cpp

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lowbit demo

# llama.cpp's tools, built once per host ISA from the llama-cpp-python sdist (~8 minutes, then cached):
# the tests have llama.cpp itself read lowbit's GGUF files.
llama-cpp: setup
	.venv/bin/python -m lowbit.io.interop.llamacpp

test: setup llama-cpp
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/python -m pytest -m "not slow" -q

test-slow: setup llama-cpp  # exit 5 = no test is marked slow yet: not a failure
	.venv/bin/python -m pytest -m slow -q || [ $$? -eq 5 ]

bench: setup
	mkdir -p results
	.venv/bin/python benchmarks/granularity.py --json-out results/granularity.json
