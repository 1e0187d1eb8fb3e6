"""Where lowbit caches converted models and extracted text."""
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lowbit")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p
