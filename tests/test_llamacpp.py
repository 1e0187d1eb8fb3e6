"""llama.cpp itself reads what lowbit writes: every GGUF type, in the engine users serve with.

The tools are built by `make test` (python -m lowbit.io.interop.llamacpp, cached per ISA);
a host where they were not built skips these tests with that reason.
"""
import copy
import re

import gguf
import numpy as np
import pytest

from lowbit.api import quantize
from lowbit.core.scheme import GGUF_PRESETS, Recipe
from lowbit.io.interop import llamacpp
from lowbit.runtime.qlinear import quantized_modules

pytestmark = pytest.mark.skipif(llamacpp.tool("llama-perplexity") is None,
                                reason="llama.cpp's tools are not built here (make test builds them)")
TYPES = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k"]


def _embedded_gguf():
    from lowbit.models.load import embedded_gguf

    return embedded_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory, embedded):
    from lowbit.io.text import load_text, split_text

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(split_text(load_text("wiki"))[1][:40000], encoding="utf-8")
    return path


def _kld(model_path, base_path, text, *, make_base=False):
    """llama-perplexity's mean KLD and same-top-token share of `model_path` against the saved base."""
    flag = "--kl-divergence-base" if make_base else "--kl-divergence"
    args = ["-m", model_path, "-f", text, "-c", "128", "--chunks", "6", "-b", "128", flag]
    args += [base_path] if make_base else ["--kl-divergence-base", base_path]
    out = llamacpp.run("llama-perplexity", *args, threads=2, timeout=600)
    if make_base:
        return None
    log = out.stdout + out.stderr
    kld = float(re.search(r"Mean\s+KLD:\s+([-0-9.]+)", log).group(1))
    top = float(re.search(r"Same top p:\s+([0-9.]+)", log).group(1))
    return kld, top


def test_llama_cpp_reads_every_gguf_type_lowbit_writes_to_the_same_logits(embedded, eval_text, tmp_path):
    """One model with a different GGUF type in each layer (K-quants on the rows 256 divides,
    llama-quantize's fallback on the others), run by llama.cpp, against llama.cpp's F32 run of
    exactly the weights lowbit's codes decode to: the same model, so KLD ~ 0 (what remains is
    llama.cpp quantizing activations for its dot products); a misread block type would be garbage."""
    from lowbit.io.interop.gguf_io import export_gguf

    model, _ = embedded
    qmodel = copy.deepcopy(model)
    n_layers = model.config.num_hidden_layers
    # absmax scales: the same storage (so the same GGUF type) as the searching presets, in one pass
    fast = {t: GGUF_PRESETS[t].with_(scale_method="absmax", name=t) for t in TYPES}
    recipe = Recipe(scheme=fast["q4_0"], method="rtn",
                    overrides={f"model.layers.{i}.*": fast[TYPES[i % len(TYPES)]] for i in range(n_layers)})
    quantize(qmodel, recipe=recipe, progress=False)
    qmods = quantized_modules(qmodel)
    assert {m.scheme.name for m in qmods.values()} == set(TYPES)

    dq = copy.deepcopy(model)  # the weights lowbit's codes decode to, in float
    for name, m in qmods.items():
        dq.get_submodule(name).weight.data.copy_(m.qweight.dequantize())
    q_path, f_path, base = tmp_path / "q.gguf", tmp_path / "f32.gguf", tmp_path / "base.kld"
    rep = export_gguf(qmodel, None, q_path, source_gguf=_embedded_gguf())
    export_gguf(dq, None, f_path, source_gguf=_embedded_gguf(), float_type="f32")
    written = {t.tensor_type.name for t in gguf.GGUFReader(q_path).tensors}
    assert written >= {"Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "Q2_K"}, rep

    _kld(f_path, base, eval_text, make_base=True)
    kld, top = _kld(q_path, base, eval_text)
    assert kld < 0.01 and top > 95.0, (kld, top)


def test_imported_llama_quantize_k_quants_reexport_byte_identical(embedded, tmp_path):
    """llama-quantize's own Q4_K_M (Q4_K, Q6_K, Q5_0 and Q8_0 tensors) -> lowbit import -> GGUF export:
    every quantized block comes back byte for byte (two-level scales factor back exactly)."""
    from lowbit.io.interop.gguf_io import export_gguf, import_gguf

    f16 = tmp_path / "f16.gguf"
    export_gguf(embedded[0], None, f16, source_gguf=_embedded_gguf(), embed_type="f16")
    km = tmp_path / "q4km.gguf"
    llamacpp.run("llama-quantize", f16, km, "Q4_K_M", "2", timeout=600)
    model, _, qts = import_gguf(km)
    kinds = {q.scheme.name for q in qts.values()}
    assert {"q4_k", "q6_k"} <= kinds, kinds
    out = tmp_path / "again.gguf"
    export_gguf(model, None, out, source_gguf=km)
    a = {t.name: t for t in gguf.GGUFReader(km).tensors}
    b = {t.name: t for t in gguf.GGUFReader(out).tensors}
    checked = 0
    for name, t in a.items():
        if t.tensor_type.name in ("Q4_K", "Q6_K", "Q5_0", "Q8_0") and name.startswith("blk."):
            assert b[name].tensor_type == t.tensor_type and np.array_equal(b[name].data, t.data), name
            checked += 1
    assert checked == len(qts)
