"""GGUF types as lowbit schemes: their grids, two-level scales, GPTQ on them, llama.cpp's
fallbacks, imatrix files and type mixes by measurement (no llama.cpp needed here;
tests/test_llamacpp.py has llama.cpp read the files)."""
import numpy as np
import pytest
import torch

from lowbit.algorithms.gptq import gptq
from lowbit.core.qparams import fake_quantize, group_view
from lowbit.core.scheme import GGUF_PRESETS, Scheme, fitting
from lowbit.core.tensor import quantize_tensor
from lowbit.errors import UserError


def _correlated_inputs(n=2048, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :8] *= 6  # a few loud channels, as in LLM activations
    return x


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "iq4_xs", "q6_k", "q4_0", "iq4_nl", "q5_1"])
def test_gptq_on_each_gguf_grid_beats_rtn_on_the_output(name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 512, generator=g) * torch.linspace(0.2, 1.5, 512)
    x = _correlated_inputs(n=1024)
    H = x.t() @ x / x.shape[0]
    s = GGUF_PRESETS[name]
    rtn = quantize_tensor(w, s)
    q = gptq(w, H, s)
    assert q.scheme == s and q.scale.shape == rtn.scale.shape
    err = lambda qt: float(((x @ (qt.dequantize() - w).t()) ** 2).mean())  # noqa: E731
    assert err(q) < 0.9 * err(rtn), (err(q), err(rtn))


def test_two_level_scales_are_small_integers_times_one_fp16_per_super_block():
    from lowbit.io.interop.gguf_blocks import _factor

    w = torch.randn(4, 512) * 3
    for name, lo, hi in [("q4_k", 1, 63), ("q6_k", -128, 127), ("q3_k", -32, 31), ("iq4_xs", -32, 31), ("q2_k", 1, 15)]:
        s = quantize_tensor(w, name).scales().reshape(8, -1)  # two super-blocks of 256 per row
        d, q = _factor(s.numpy(), hi, lo)  # raises unless each is fp16 d x integers in [lo, hi]
        assert np.all(d != 0) and np.all(q != 0) and np.all((q >= lo) & (q <= hi)), name


def test_k_quant_rows_256_does_not_divide_fall_back_like_llama_quantize(embedded):
    from lowbit.api import make_recipe
    from lowbit.quantization.job import target_modules

    model, _ = embedded  # hidden 576 (not a multiple of 256), intermediate 1536 (a multiple)
    t = target_modules(model, make_recipe("q4_k", "rtn"))
    assert t["model.layers.0.self_attn.q_proj"].name == "q5_0"
    assert t["model.layers.0.mlp.gate_proj"].name == "q5_0"
    assert t["model.layers.0.mlp.down_proj"].name == "q4_k"
    assert {fitting(GGUF_PRESETS[k], 576).name for k in ("q6_k", "q5_k", "q3_k", "q2_k", "iq4_xs")} == \
        {"q8_0", "q5_1", "q4_0", "iq4_nl"}


def test_planner_counts_gguf_bits_per_weight_as_llama_cpp_stores_them():
    from lowbit.plan.planner import linear_bytes

    for name, bpw in [("q4_k", 4.5), ("q6_k", 6.5625), ("q3_k", 3.4375), ("q2_k", 2.625), ("iq4_xs", 4.25),
                      ("q4_0", 4.5), ("q4_1", 5.0), ("q5_0", 5.5), ("q8_0", 8.5), ("iq4_nl", 4.5)]:
        c, s, _ = linear_bytes(4096, 4096, GGUF_PRESETS[name], 2)
        assert 8 * (c + s) / 4096**2 == bpw, name
        qt = quantize_tensor(torch.randn(8, 4096), name)
        assert 8 * qt.format_nbytes / qt.numel == bpw, name


def test_signed_range_search_uses_the_whole_int4_grid():
    """The value of largest magnitude may land on -8 (llama.cpp's Q4_0 rule) or the grid may
    flip: with -8..7 both reachable, no group ends up using only 15 levels by construction."""
    x = torch.randn(512, 32)
    qt = quantize_tensor(x, "q4_0")
    codes = qt.unpacked_codes()
    assert (codes == 0).any(dim=1).float().mean() > 0.5  # code 0 is v = -8
    assert (qt.scales() < 0).any() and (qt.scales() > 0).any()
    plain = quantize_tensor(x, GGUF_PRESETS["q4_0"].with_(scale_method="absmax"))
    assert torch.linalg.norm(qt.dequantize() - x) < 0.93 * torch.linalg.norm(plain.dequantize() - x)


def test_weights_on_a_coarser_affine_grid_land_exactly_on_a_finer_one():
    """Weights already on a 4-bit g32 affine grid (a Q4_1 or QAT checkpoint): 31 = 2 x 15 + 1, so
    Q5_1 holds them exactly once the search tries the range over 30 steps, and Q5_K comes within
    its 6-bit sub-block scales (about Q4_K's error, not 5x it: the range shrink alone misses it)."""
    g = torch.Generator().manual_seed(0)
    lo = (-torch.rand(64, 8, 1, generator=g) * 0.05).half().float()  # fp16 scale and min, as Q4_1 stores
    step = (torch.rand(64, 8, 1, generator=g) * 0.01 + 1e-3).half().float()
    codes = torch.randint(0, 16, (64, 8, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its whole grid
    w = (lo + step * codes).reshape(64, 256)
    rel = lambda s: float((quantize_tensor(w, s).dequantize() - w).pow(2).sum() / w.pow(2).sum())  # noqa: E731
    assert rel("q4_1") < 1e-9
    assert rel("q5_1") < 1e-9
    # the 6-bit sub-block scales searched by the values they give, not only rounded to nearest
    # (which left 4.9e-5 at Q5_K and 5.5e-5 at Q4_K here)
    assert rel("q5_k") < rel("q4_k") < 3.2e-5


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_xs"])
def test_k_quant_scales_follow_the_importance(name):
    """An imatrix (or GPTQ's Hessian diagonal) weights the two-level step too: from the same
    sub-block scales, the integers and factors it picks leave a lower weighted error than
    the unweighted search does."""
    from lowbit.core.qparams import choose_qparams, fake_quant_grouped, superblock_qparams

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g)
    imp = torch.rand(512, generator=g) ** 4 * 100  # a few columns matter far more
    s = Scheme.parse(name)
    xg, wg = group_view(x, s), group_view(imp.reshape(1, -1), s)
    scale, zero = choose_qparams(x, s.with_(super_block=None, scale_bits=None), imp)
    werr = lambda qp: float(((fake_quant_grouped(xg, *qp, s) - xg) ** 2 * wg).sum())  # noqa: E731
    assert werr(superblock_qparams(xg, scale, zero, s, wg)) < 0.9 * werr(superblock_qparams(xg, scale, zero, s))


def test_iq4_nl_grid_is_llama_cpps_table():
    s = Scheme.parse("iq4_nl")
    assert s.number_format.grid().tolist() == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    x = torch.randn(64, 64)
    assert torch.linalg.norm(fake_quantize(x, s) - x) < 0.12 * torch.linalg.norm(x)


# ---- imatrix files -------------------------------------------------------------------------

def test_imatrix_round_trip_and_weighted_rtn(embedded, tmp_path):
    from lowbit.io.interop.imatrix import read_imatrix, write_imatrix

    model, _ = embedded
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    cols = {n: model.get_submodule(n).in_features for n in names}
    sums = {n: (torch.rand(c, dtype=torch.float64) * 100, 512) for n, c in cols.items()}
    path = tmp_path / "m.imatrix.gguf"
    assert write_imatrix(path, model.config, sums, dataset="wiki", chunks=4, chunk_size=128) == 2
    back = read_imatrix(path, model.config, cols)
    for n in names:
        assert torch.allclose(back[n].double(), sums[n][0] / 512, rtol=1e-6)
    with pytest.raises(UserError, match="input channels"):
        read_imatrix(path, model.config, {names[0]: 7})
    from lowbit.models.load import embedded_gguf
    with pytest.raises(UserError, match="not an importance matrix"):
        read_imatrix(embedded_gguf("smollm2-135m"), model.config, cols)


def test_quantize_with_imatrix_weights_the_scale_search(embedded, tmp_path):
    """RTN with an importance matrix lowers the importance-weighted weight error (what it optimises)."""
    import copy

    from lowbit.api import make_recipe, quantize
    from lowbit.io.interop.imatrix import write_imatrix
    from lowbit.quantization.job import MethodOptions
    from lowbit.runtime.qlinear import quantized_modules

    model = copy.deepcopy(embedded[0])
    name = "model.layers.0.mlp.down_proj"
    # the embedded weights are Q4_1 already: any 4-bit g32 affine grid holds them almost exactly
    w = torch.randn_like(model.get_submodule(name).weight) * 0.02
    model.get_submodule(name).weight.data.copy_(w)
    imp = torch.rand(w.shape[1], dtype=torch.float64) ** 4 * 50  # a few channels matter far more
    path = tmp_path / "imp.gguf"
    write_imatrix(path, model.config, {name: (imp, 1)}, dataset="synthetic", chunks=1, chunk_size=1)
    recipe = make_recipe("q4_k", "rtn", include=["model.layers.0.mlp.down_proj"])
    plain = quantized_modules(quantize(copy.deepcopy(model), recipe=recipe, progress=False).model)[name]
    res = quantize(copy.deepcopy(model), recipe=recipe, progress=False, method_options=MethodOptions(imatrix=str(path)))
    weighted = quantized_modules(res.model)[name]
    assert res.info["imatrix"]["entries"] == 1
    e = lambda m: float((((m.qweight.dequantize() - w) ** 2) * imp.float()).sum())  # noqa: E731
    assert e(weighted) < 0.97 * e(plain)
    with pytest.raises(UserError, match="calibrates its own"):
        quantize(copy.deepcopy(model), recipe=make_recipe("q4_k", "gptq"), progress=False,
                 method_options=MethodOptions(imatrix=str(path)))


# ---- type mixes by measurement --------------------------------------------------------------

def test_allocation_over_gguf_types_counts_their_real_bits():
    from lowbit.algorithms.mixed import allocate, width

    assert width("q4_k", 1536) == 4.5 and width("q4_k", 576) == 5.5  # a 576-wide row gets Q5_0
    costs = {"a": {"q4_k": 1.0, "q6_k": 0.1}, "b": {"q4_k": 0.5, "q6_k": 0.45}}
    sizes = {"a": 1000, "b": 1000}
    widths = {n: {c: width(c, 1536) for c in ("q4_k", "q6_k")} for n in sizes}
    assert allocate(costs, sizes, 5.6, widths) == {"a": "q6_k", "b": "q4_k"}
    assert allocate(costs, sizes, 4.5, widths) == {"a": "q4_k", "b": "q4_k"}
    with pytest.raises(UserError, match="below the smallest"):
        allocate(costs, sizes, 4.0, widths)


def test_target_bits_over_gguf_types_mixes_them_by_measured_kl(embedded, wiki_windows):
    from lowbit.algorithms.mixed import mixed_recipe
    from lowbit.api import make_recipe

    model, _ = embedded
    calib, _ = wiki_windows
    recipe = make_recipe("q3_k", "rtn", include=["model.layers.0.*"])
    # layer 0's rows are 576 wide (Q3_K -> Q4_0 at 4.5 bpw, Q6_K -> Q8_0 at 8.5) but for down_proj's 1536.
    # (Not Q4_K against Q6_K: the embedded weights are Q4_1, which affine 4-bit Q4_K holds almost exactly.)
    mixed, info = mixed_recipe(model, calib[:1, :64], recipe, 6.5, choices=("q3_k", "q6_k"), progress=False)
    assert info["bits_counted"] == "all stored bits (GGUF bpw)"
    assert 5.5 <= info["average_bits"] <= 6.5 + 1e-9
    chosen = {mixed.scheme_for(n).name for n in info["bits"]}
    assert chosen == {"q3_k", "q6_k"}  # the budget buys some layers the larger type
    assert info["predicted_kl"] <= info["predicted_kl_uniform"]["q3_k"]
