import copy

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M in float (converted once into the user cache)."""
    from lowbit.models import load_float

    model, tok = load_float("smollm2-135m")
    return model, tok


@pytest.fixture(scope="session")
def wiki_windows(embedded):
    """Small calibration (16 x 256) and held-out evaluation (8 x 256) windows."""
    from lowbit.io.text import text_windows

    _, tok = embedded
    return text_windows(tok, "wiki", "text", 256, calib_samples=16, eval_max=8, seed=0)


@pytest.fixture
def fresh_model(embedded):
    return copy.deepcopy(embedded[0])


@pytest.fixture(scope="session")
def bigmodel_bench():
    """benchmarks/bigmodel.py as a module: synthetic Llama checkpoints and measured child runs."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bigmodel.py"
    spec = importlib.util.spec_from_file_location("bigmodel", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bigmodel"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=["avx512", "avx2"])
def native_isa(request, monkeypatch):
    """The test once per build of lowbit's own CPU kernels, dispatch pinned to it; a build
    this CPU cannot run is skipped (CI on an AVX-512 host runs both: the AVX2 one is the
    fallback of every CPU without AVX512-BF16). Parametrized indirectly, None leaves
    dispatch alone (a case for PyTorch's kernels)."""
    import os

    from lowbit.runtime.kernels import native

    isa = request.param
    if isa is None:
        return None
    if os.environ.get("LOWBIT_NATIVE_KERNELS") == "0" or not native.runs(isa):
        pytest.skip(f"this CPU does not run lowbit's {isa} kernels (or LOWBIT_NATIVE_KERNELS=0)")
    assert native.build(isa) is not None, f"lowbit's {isa} kernels failed to build on a CPU that runs them"
    monkeypatch.setattr(native, "isa", lambda: isa)
    return isa
