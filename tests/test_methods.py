"""The method arsenal: folds and rotations keep the float function; each method beats its naive baseline."""
import copy
import json

import pytest
import torch

from lowbit.api import make_recipe, quantize
from lowbit.core.layer import QuantizedLayer
from lowbit.core.method import Method
from lowbit.errors import UserError
from lowbit.evaluate.quality import evaluate_many
from lowbit.io.lowbit_dir import load_quantized, save_quantized
from lowbit.quantization.job import MethodOptions
from lowbit.runtime.qlinear import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _kl(models, base, windows):
    return {k: v["kl_divergence"] for k, v in evaluate_many(models, windows, base, progress=False).items()}


# ---- float invariance ----------------------------------------------------------

@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_folding_scales_leaves_float_outputs_unchanged(fresh_model, embedded, wiki_windows, method):
    from lowbit.algorithms.smooth import make_prepare
    from lowbit.core.scheme import Scheme
    from lowbit.models.adapters import attention_heads, decoder_layers, linear_modules
    from lowbit.quantization.runner import BlockInputs, StatsCollector

    base, _ = embedded
    calib, held_out = wiki_windows
    model = fresh_model
    prefix, layers = decoder_layers(model)
    inputs = BlockInputs.capture(model, calib[:2, :64], 2)
    for i in (0, 1):
        names = {f"{prefix}.{i}.{n}": m for n, m in linear_modules(layers[i]).items()}
        col = StatsCollector(names, hessian=True)
        inputs.feed(layers[i])
        col.close()
        stats = {n: col.pop(n) for n in names}
        prepare, log = make_prepare(method, {n: Scheme.parse("w3a16-g64") for n in names}, attention_heads(model))
        prepare(layers[i], names, stats)
        assert len(log) == 4 and all(g["scale_max"] > g["scale_min"] > 0 for g in log)
        inputs = inputs.run(layers[i])
    ids = held_out[:2, :128]
    ref, out = _logits(base, ids), _logits(model, ids)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)


def test_rotation_leaves_float_outputs_unchanged(fresh_model, embedded, wiki_windows):
    from lowbit.algorithms.rotate import OnlineHadamardLinear, rotate_model

    base, _ = embedded
    ids = wiki_windows[1][:2, :128]
    info = rotate_model(fresh_model, seed=3)
    assert info["hidden"] == 576 and isinstance(fresh_model.model.layers[0].mlp.down_proj, OnlineHadamardLinear)
    ref, out = _logits(base, ids), _logits(fresh_model, ids)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # the stream really is rotated: embeddings differ, norms are folded to ones
    assert not torch.allclose(fresh_model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.all(fresh_model.model.layers[3].input_layernorm.weight == 1)


@pytest.mark.parametrize("n", [12, 20, 64, 576, 1536, 2560])
def test_hadamard_is_orthonormal_and_the_fast_transform_matches(n):
    from lowbit.core.transforms import hadamard, hadamard_transform

    H = hadamard(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n ** -0.5))  # entries +-1/sqrt(n): a Hadamard matrix
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ H, atol=1e-10)


def test_hadamard_of_an_unbuildable_order_is_a_clear_error():
    from lowbit.core.transforms import hadamard

    with pytest.raises(UserError, match="no Hadamard matrix of order 36"):
        hadamard(36)


# ---- each method beats its naive baseline -------------------------------------

FIRST_BLOCKS = ["model.layers.[0-5].*"]  # keeps the slow searches short; the comparison is like for like


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_awq_beats_rtn_at_w3_g64(embedded, wiki_windows):
    base, _ = embedded
    calib, held_out = wiki_windows
    models = {}
    for method in ("rtn", "awq"):
        recipe = make_recipe("w3a16-g64", method, include=FIRST_BLOCKS)
        models[method] = quantize(copy.deepcopy(base), recipe=recipe, calib_ids=calib, progress=False).model
    kl = _kl(models, base, held_out)
    assert kl["awq"] < 0.8 * kl["rtn"]


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_smoothquant_w8a8_beats_naive_w8a8(embedded, wiki_windows, tmp_path):
    base, _ = embedded
    calib, held_out = wiki_windows
    models, results = {}, {}
    for method in ("rtn", "smoothquant"):
        results[method] = quantize(copy.deepcopy(base), recipe=make_recipe("w8a8", method), calib_ids=calib, progress=False)
        models[method] = results[method].model
    kl = _kl(models, base, held_out)
    assert kl["smoothquant"] < 0.75 * kl["rtn"]
    q = models["smoothquant"].model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.scheme.activations.name == "int8-token"


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_rotation_makes_w4a4_usable(embedded, wiki_windows):
    base, _ = embedded
    calib, held_out = wiki_windows
    models = {m: quantize(copy.deepcopy(base), recipe=make_recipe("w4a4", m), calib_ids=calib, progress=False).model
              for m in ("rtn", "rotate")}
    kl = _kl(models, base, held_out)
    assert kl["rotate"] < 0.6 * kl["rtn"]


def test_static_w8a8_and_rotation_and_outlier_split_survive_save_and_reload(embedded, wiki_windows, tmp_path):
    base, tok = embedded
    calib, held_out = wiki_windows
    ids = held_out[:1, :64]
    for i, (method, scheme) in enumerate([("smoothquant", "w8a8-static"), ("rotate", "w4a8"), ("outlier-split", "w8a8")]):
        res = quantize(copy.deepcopy(base), recipe=make_recipe(scheme, method), calib_ids=calib[:4], progress=False)
        out = save_quantized(res.model, tok, tmp_path / str(i), res.info)
        back, _, meta = load_quantized(out)
        assert torch.equal(_logits(back, ids), _logits(res.model, ids)), method
        q = back.model.layers[2].mlp.down_proj
        if scheme.endswith("static"):
            assert q.act_scale is not None and float(q.act_scale) > 0
        if method == "rotate":
            assert q.input_transform == "hadamard"
        if method == "outlier-split":
            assert res.info["outlier_split"]["float_input_channels"] > 0
            assert 0 < res.info["outlier_split"]["float_fraction"] < 0.2


def test_outlier_split_keeps_float_channels_out_of_activation_rounding():
    from lowbit.core.scheme import Scheme
    from lowbit.core.tensor import quantize_tensor

    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.1
    x = torch.randn(4, 32)
    x[:, 5] = 200.0  # an outlier channel that would set every token's scale
    cols = torch.tensor([5])
    w0 = w.clone()
    w0[:, cols] = 0
    scheme = Scheme.parse("w8a8")
    split = QuantLinear(QuantizedLayer(quantize_tensor(w0, scheme), float_cols=cols, float_weight=w[:, cols]))
    plain = QuantLinear(QuantizedLayer(quantize_tensor(w, scheme)))
    ref = x @ w.T
    err_split = (split(x) - ref).norm() / ref.norm()
    err_plain = (plain(x) - ref).norm() / ref.norm()
    assert err_split < 0.01 < err_plain


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_mixed_precision_at_3_5_bits_beats_uniform_3_bit(embedded, wiki_windows):
    from lowbit.algorithms.mixed import mixed_recipe

    base, _ = embedded
    calib, held_out = wiki_windows
    blocks = ["model.layers.[0-3].*"]
    uniform = make_recipe("w3a16-g64-asym", "rtn", include=blocks)
    mixed, info = mixed_recipe(base, calib[:1, :128], uniform, 3.5, progress=False)
    assert info["average_bits"] <= 3.5 + 1e-9 and info["average_bits"] > 3.3
    assert set(info["layers_per_bits"]) == {3, 4} and all(v > 0 for v in info["layers_per_bits"].values())
    assert len(mixed.overrides) == 4 * 7 and info["predicted_kl"] < info["predicted_kl_uniform"][3]
    models = {name: quantize(copy.deepcopy(base), recipe=r, progress=False).model
              for name, r in (("uniform", uniform), ("mixed", mixed))}
    kl = _kl(models, base, held_out)
    assert kl["mixed"] < kl["uniform"]
    # reusable: the recipe round-trips through JSON
    from lowbit.core.scheme import Recipe
    assert Recipe.from_dict(mixed.to_dict()).overrides == mixed.overrides


def test_allocation_meets_the_budget_with_the_least_cost():
    from lowbit.algorithms.mixed import allocate

    costs = {"a": {3: 10.0, 4: 1.0}, "b": {3: 2.0, 4: 1.5}, "c": {3: 5.0, 4: 0.5}}
    sizes = {"a": 100, "b": 100, "c": 200}
    # budget 1400 bits, 1200 used at 3 bits: a + b (saving 9.5) beats c alone (saving 4.5)
    assert allocate(costs, sizes, 3.5) == {"a": 4, "b": 4, "c": 3}
    assert allocate(costs, sizes, 3.75) == {"a": 4, "b": 3, "c": 4}  # 300 spare bits: a + c saves 13.5
    with pytest.raises(UserError, match="below the smallest"):
        allocate(costs, sizes, 2.0)


def test_qat_lowers_the_distillation_loss_and_exports_codes():
    import transformers

    from lowbit.algorithms.qat import QATOptions

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (8, 32))
    rtn = quantize(copy.deepcopy(model), recipe=make_recipe("w3a16-g32-asym", "rtn"), progress=False, float_dtype=torch.float32)
    opts = MethodOptions(qat=QATOptions(steps=30, batch_size=8, seq_len=32, lr=1e-3, scale_lr=1e-2))
    qat = quantize(copy.deepcopy(model), recipe=make_recipe("w3a16-g32-asym", "qat"), calib_ids=ids, progress=False, method_options=opts, float_dtype=torch.float32)
    info = qat.info["qat"]
    assert info["loss_last"] < 0.7 * info["loss_first"] and info["codes_changed_fraction"] > 0
    kl = _kl({"rtn": rtn.model, "qat": qat.model}, model, ids)
    assert kl["qat"] < kl["rtn"]
    assert isinstance(qat.model.model.layers[0].mlp.up_proj, QuantLinear)
    # activation-quantizing schemes train through rounded inputs, a static one with its calibrated scale
    opts.qat.steps = 2
    static = quantize(copy.deepcopy(model), recipe=make_recipe("w8a8-static", "qat"), calib_ids=ids, progress=False, method_options=opts, float_dtype=torch.float32)
    assert float(static.model.model.layers[0].mlp.down_proj.act_scale) > 0


# ---- KV cache ------------------------------------------------------------------

def test_kv_cache_quantization_costs_little_and_its_bytes_match_the_planner(embedded, wiki_windows):
    from lowbit.plan.planner import arch_from_hf_config, kv_cache_bytes
    from lowbit.runtime.kvcache import QuantizedKVCache, cache_kwargs, kv_logprobs

    base, _ = embedded
    ids = wiki_windows[1][:2, :128]
    ref = kv_logprobs(base, ids, None)
    kls = {}
    for fmt in ("int8", "fp8"):
        lp = kv_logprobs(base, ids, fmt)
        kls[fmt] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert 0 < kls["int8"] < kls["fp8"] < 0.05
    cache = QuantizedKVCache(base.config, "int8")
    with torch.no_grad():
        base(input_ids=ids, **cache_kwargs(base, cache), use_cache=True)
        base(input_ids=ids[:, :1], **cache_kwargs(base, cache), use_cache=True)  # one decode step appends
    arch = arch_from_hf_config(base.config.to_dict())
    assert cache.nbytes() == kv_cache_bytes(arch, 129, 2, "int8")


# ---- parsing -------------------------------------------------------------------

@pytest.mark.parametrize("text,name", [("awq", "awq"), ("AWQ+GPTQ", "awq+gptq"), ("rotate+gptq", "rotate+gptq"),
                                       ("outlier-split", "outlier-split"), ("smoothquant+gptq", "smoothquant+gptq"),
                                       ("qat", "qat"), ("rtn", "rtn")])
def test_method_names_parse_to_canonical_form(text, name):
    assert Method.parse(text).name == name


@pytest.mark.parametrize("text,msg", [("awq+smoothquant", "pick one"), ("gptq+qat", "two quantizers"),
                                      ("rotate+awq", "rotate already"), ("hqq", "unknown method"), ("", "unknown method"),
                                      ("gptq+awq", "write it as")])
def test_bad_method_names_are_one_line_errors(text, msg):
    with pytest.raises(UserError, match=msg):
        Method.parse(text)


# ---- CLI -----------------------------------------------------------------------

def _cli(*argv, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lowbit", "--quiet", *argv], capture_output=True, text=True, cwd=cwd)


def test_cli_target_bits_saves_a_recipe_that_reruns_to_the_same_bytes(tmp_path):
    common = ["--method", "rtn", "--scheme", "w3a16-g64-asym", "--include", "model.layers.0.*",
              "--seq-len", "64", "--samples", "2"]
    r = _cli("quantize", "smollm2-135m", *common, "--target-bits", "3.5", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "mixed precision: 3.5" in r.stdout and "--recipe" in r.stdout
    meta = json.loads((tmp_path / "a" / "lowbit.json").read_text())
    per_bits = meta["mixed_precision"]["layers_per_bits"]
    assert set(per_bits) == {"3", "4"} and sum(per_bits.values()) == 7 and meta["mixed_precision"]["average_bits"] <= 3.5
    bits = {meta["modules"][n]["scheme"]["format"] for n in meta["modules"]}
    assert bits == {"int3", "int4"}
    r = _cli("quantize", "smollm2-135m", "--recipe", str(tmp_path / "a" / "lowbit.json"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    shards = sorted(f.name for f in (tmp_path / "a").glob("*.safetensors"))
    assert shards and shards == sorted(f.name for f in (tmp_path / "b").glob("*.safetensors"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in shards)


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "smollm2-135m", "--method", "hqq", "--out", "x"], "unknown method 'hqq'"),
    (["quantize", "smollm2-135m", "--method", "awq+smoothquant", "--out", "x"], "pick one"),
    (["quantize", "smollm2-135m", "--recipe", "/no/such.json", "--out", "x"], "--recipe /no/such.json"),
    (["quantize", "smollm2-135m", "--scheme", "w4a16-static", "--out", "x"], "-static applies"),
    (["quantize", "smollm2-135m", "--method", "rotate", "--exclude", "*down_proj", "--out", "x"], "must quantize it"),
])
def test_method_cli_errors_are_one_line(argv, msg, tmp_path):
    r = _cli(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_exports_refuse_what_their_loaders_would_drop(tmp_path):
    import transformers

    from lowbit.io.interop import export_model

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    res = quantize(model, recipe=make_recipe("w8a8", "rtn"), progress=False)
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(UserError, match="quantizes its activations"):
            export_model(res.model, None, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
