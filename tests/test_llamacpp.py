"""llama.cpp itself reads what lowbit writes: every GGUF type, in the engine users serve with.

The tools are built by `make test` (python -m lowbit.io.interop.llamacpp, cached per ISA);
a host where they were not built skips these tests with that reason.
"""
import copy

import gguf
import numpy as np
import pytest
import torch
import transformers as T

from lowbit.api import quantize
from lowbit.core.scheme import GGUF_PRESETS, Recipe, fitting
from lowbit.io.interop import llamacpp
from lowbit.runtime.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(llamacpp.tool("llama-perplexity") is None,
                                reason="llama.cpp's tools are not built here (make test builds them)")
TINY = dict(vocab_size=49152, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)
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


def _agreement(model, gguf_path, text, chunks=4):
    """llama.cpp's next-token distributions for the GGUF file against lowbit's model (fp32 reference
    path) on the same tokens: mean KL(llama.cpp || lowbit), top-1 agreement, lowbit's mean top probability."""
    tokens, theirs = llamacpp.log_probs(gguf_path, text, ctx=128, chunks=chunks)
    QuantLinear.policy = "reference"
    try:
        with torch.no_grad():
            ours = model(torch.from_numpy(tokens).long()).logits.float().log_softmax(-1)[:, 64:127].numpy()
    finally:
        QuantLinear.policy = "auto"
    p = np.exp(theirs)
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (theirs - ours), 0.0).sum(-1)
    return float(kl.mean()), float((theirs.argmax(-1) == ours.argmax(-1)).mean()), float(np.exp(ours.max(-1)).mean())


def test_llama_cpp_reads_every_gguf_type_lowbit_writes_to_lowbits_logits(embedded, eval_text, tmp_path):
    """One model with a different GGUF type in each layer (K-quants on the rows 256 divides,
    llama-quantize's fallback on the others), run by llama.cpp: its next-token distributions
    (read from llama-perplexity's logits file) against lowbit's own model of the same codes.
    What remains is llama.cpp quantizing activations for its dot products; a misread block
    type or layout would be garbage."""
    from lowbit.io.interop.gguf_io import export_gguf

    model, _ = embedded
    qmodel = copy.deepcopy(model)
    # absmax scales: the same storage (so the same GGUF type) as the searching presets, in one pass;
    # per module, the type its row width really gets (llama-quantize's fallback where 256 does not divide)
    fast = {t: GGUF_PRESETS[t].with_(scale_method="absmax", name=t) for t in TYPES}
    overrides = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            t = TYPES[int(name.split(".")[2]) % len(TYPES)]
            overrides[name] = fast[fitting(GGUF_PRESETS[t], mod.in_features).name]
    recipe = Recipe(scheme=fast["q4_0"], method="rtn", overrides=overrides)
    quantize(qmodel, recipe=recipe, progress=False)
    q_path = tmp_path / "q.gguf"
    rep = export_gguf(qmodel, None, q_path, source_gguf=_embedded_gguf())
    written = {t.tensor_type.name for t in gguf.GGUFReader(q_path).tensors}
    assert written >= {"Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "Q2_K"}, rep
    kl, top1, _ = _agreement(qmodel, q_path, eval_text)
    assert kl < 0.01 and top1 > 0.9, (kl, top1)


MOE = {
    "mixtral": lambda: T.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **TINY),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                          num_experts_per_tok=2, norm_topk_prob=True, head_dim=32, **TINY),
}


@pytest.mark.parametrize("family", list(MOE))
def test_llama_cpp_runs_lowbits_experts_to_lowbits_logits(family, eval_text, tmp_path):
    """A tiny random MoE model (the embedded vocabulary, so the embedded tokenizer applies):
    its float GGUF (3-D ffn_*_exps tensors, router, expert counts) runs in llama.cpp to the same
    distributions as in lowbit; with every expert at Q4_0, llama.cpp stays with lowbit's model of
    those codes (what differs is llama.cpp rounding activations to 8 bits for its dot products),
    far closer than to the float model the codes came from."""
    from lowbit.io.interop.gguf_io import export_gguf
    from lowbit.models.moe import unfuse_experts

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(MOE[family]()).eval()
    with torch.no_grad():  # weights large enough that the next-token distribution is peaked
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15 if "embed" not in name else 1.0)
    unfuse_experts(model)
    float_path = tmp_path / "f32.gguf"
    export_gguf(model, None, float_path, source_gguf=_embedded_gguf(), embed_type="f32", float_type="f32")
    kl, top1, peak = _agreement(model, float_path, eval_text, chunks=2)
    assert peak > 0.3 and kl < 1e-3 and top1 > 0.97, (peak, kl, top1)

    fast = {t: GGUF_PRESETS[t].with_(scale_method="absmax") for t in ("q8_0", "q4_0")}
    res = quantize(copy.deepcopy(model), recipe=Recipe(scheme=fast["q8_0"], method="rtn", overrides={"*.experts.*": fast["q4_0"]}),
                   progress=False)
    path = tmp_path / "q.gguf"
    rep = export_gguf(res.model, None, path, source_gguf=_embedded_gguf(), embed_type="f32")
    exps = [t for t in gguf.GGUFReader(path).tensors if "_exps" in t.name]
    assert len(exps) == 3 * 2 and all(t.tensor_type.name == "Q4_0" and t.shape[-1] == 4 for t in exps), rep
    kl_codes, top1, _ = _agreement(res.model, path, eval_text, chunks=2)
    kl_float, _, _ = _agreement(model, path, eval_text, chunks=2)
    assert kl_codes < 0.15 and kl_codes < 0.1 * kl_float and top1 > 0.85, (kl_codes, kl_float, top1)


@pytest.mark.slow
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


@pytest.mark.slow
def test_imatrix_files_go_both_ways(embedded, eval_text, tmp_path):
    """llama-imatrix's file, read by lowbit, holds what lowbit measures on the same text (mean x^2
    per input channel of every Linear); lowbit's own statistics written as an imatrix are taken by
    llama-quantize --imatrix."""
    from lowbit.io.interop.gguf_io import export_gguf
    from lowbit.io.interop.imatrix import read_imatrix, write_imatrix
    from lowbit.models.adapters import linear_weight

    model, tok = embedded
    f16 = tmp_path / "f16.gguf"
    export_gguf(model, None, f16, source_gguf=_embedded_gguf(), embed_type="f16")
    theirs_path = tmp_path / "theirs.imatrix.gguf"
    llamacpp.run("llama-imatrix", "-m", f16, "-f", eval_text, "-c", "128", "--chunks", "4", "-o", theirs_path,
                 threads=2, timeout=600)
    linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
    theirs = read_imatrix(theirs_path, model.config, {n: linear_weight(m).shape[1] for n, m in linears.items()})
    assert set(theirs) == set(linears)

    sums = {n: [torch.zeros(linear_weight(m).shape[1], dtype=torch.float64), 0] for n, m in linears.items()}

    def record(mod, inp, out, n):  # (returns None: a hook's return value would replace the output)
        sums[n][0].add_((inp[0][0].double() ** 2).sum(0))
        sums[n][1] += inp[0].shape[1]

    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: record(mod, inp, out, n)) for n, m in linears.items()]
    ids = tok(eval_text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        for w in ids.split(128, dim=1):
            model(w)
    for h in hooks:
        h.remove()
    for n in linears:  # same text, cut and tokenized by each tool its own way: the profiles agree
        ours = sums[n][0] / sums[n][1]
        r = torch.corrcoef(torch.stack([ours.float().log(), theirs[n].log()]))[0, 1]
        assert r > 0.9, (n, float(r))

    mine = tmp_path / "lowbit.imatrix.gguf"
    write_imatrix(mine, model.config, {n: (s, c) for n, (s, c) in sums.items()}, dataset="heldout.txt",
                  chunks=4, chunk_size=128)
    out = llamacpp.run("llama-quantize", "--imatrix", mine, f16, tmp_path / "q.gguf", "Q4_K_M", "2", timeout=600)
    assert f"loaded {len(linears)} importance matrix entries" in out.stdout + out.stderr
