"""Model sources, architecture adapters and the sequential runner."""
import os

# lowbit never touches the network at run time: transformers must not try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers.utils import logging as _hf_logging  # noqa: E402

# transformers' per-tensor loading bars are noise next to lowbit's own progress
_hf_logging.disable_progress_bar()

from lowbit.models.adapters import decoder_layers, linear_modules  # noqa: E402
from lowbit.models.load import EMBEDDED, load_float, resolve_source  # noqa: E402

__all__ = ["EMBEDDED", "decoder_layers", "linear_modules", "load_float", "resolve_source"]
