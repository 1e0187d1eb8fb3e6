"""The vertical slice on the embedded model: sequential GPTQ/RTN, runtime, save/load, eval."""
import json

import pytest
import torch

from lowbit.api import make_recipe, quantize
from lowbit.evaluate.quality import evaluate_many
from lowbit.io.files import read_safetensors
from lowbit.io.lowbit_dir import load_quantized, save_quantized
from lowbit.runtime.qlinear import QuantLinear, model_bytes


@pytest.mark.parametrize("scheme", [pytest.param("w4a16-g64", marks=pytest.mark.slow), "w3a16-g64"])  # W3: GPTQ's clearest win
def test_gptq_beats_rtn_on_held_out_text(embedded, wiki_windows, scheme):
    import copy

    base, _ = embedded
    calib, held_out = wiki_windows
    rtn = quantize(copy.deepcopy(base), recipe=make_recipe(scheme, "rtn"), progress=False).model
    gptq = quantize(copy.deepcopy(base), recipe=make_recipe(scheme, "gptq"), calib_ids=calib, progress=False).model
    m = evaluate_many({"float": base, "rtn": rtn, "gptq": gptq}, held_out, base, progress=False)
    assert m["float"]["perplexity"] < m["gptq"]["perplexity"] < m["rtn"]["perplexity"]
    assert m["gptq"]["kl_divergence"] < m["rtn"]["kl_divergence"]
    assert m["gptq"]["top1_agreement"] > m["rtn"]["top1_agreement"]
    assert m["float"]["kl_divergence"] == 0 and m["float"]["top1_agreement"] == 1


def test_reload_reproduces_logits_and_bytes(fresh_model, embedded, wiki_windows, tmp_path):
    _, tok = embedded
    _, held_out = wiki_windows
    res = quantize(fresh_model, recipe=make_recipe("w4a16-g64-asym", "rtn"), progress=False)
    model = res.model
    qmods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qmods) == 30 * 7  # every projection of every block; lm_head / embeddings stay float
    save_quantized(model, tok, tmp_path / "q", res.info)
    back, tok2, meta = load_quantized(tmp_path / "q")
    ids = held_out[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert tok2 is not None and meta["recipe"]["method"] == "rtn"
    # stored bytes = sum of QuantizedTensors + float parts (fp16), nothing else
    tensors, _ = read_safetensors(tmp_path / "q" / "model.safetensors")
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    qbytes = sum(m.qweight.nbytes for m in qmods)
    b = model_bytes(model, torch.float16)
    assert payload == b["total_bytes"] and b["quantized_bytes"] == qbytes
    assert b["float_bytes"] == sum(p.numel() for n, p in model.named_parameters() if "lm_head" not in n and "bias" not in n) * 2


def test_quantized_weights_match_fake_quant_used_in_calibration(fresh_model, wiki_windows):
    calib, _ = wiki_windows
    res = quantize(fresh_model, recipe=make_recipe("w4a16-g64", "gptq"), calib_ids=calib[:2, :64], progress=False)
    name = "model.layers.3.mlp.down_proj"
    qt = res.layers[name].weight
    mod = res.model.get_submodule(name)
    assert torch.equal(mod.qweight.dequantize(), qt.dequantize())
    assert qt.scale.shape == (576, 1536 // 64)


def test_recipe_patterns_select_modules(fresh_model):
    recipe = make_recipe("w8a16", "rtn", exclude=["lm_head", "*embed*", "*.mlp.*"])
    res = quantize(fresh_model, recipe=recipe, progress=False)
    names = set(res.layers)
    assert all(".self_attn." in n for n in names) and len(names) == 30 * 4


TINY = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2, word_embed_proj_dim=64, max_position_embeddings=128)),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_other_families_quantize_and_reload(family, tmp_path):
    import transformers

    cls, kw = TINY[family]
    config = getattr(transformers, cls)(vocab_size=128, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (4, 32))
    with torch.no_grad():
        ref = model(ids).logits
    res = quantize(model, recipe=make_recipe("w8a16", "gptq"), calib_ids=ids, progress=False, float_dtype=torch.float32)
    with torch.no_grad():
        out = res.model(ids).logits
    assert len(res.layers) >= 4 * 2
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8-bit: close to float
    save_quantized(res.model, None, tmp_path / family, res.info, float_dtype=torch.float32)
    back, tok, _ = load_quantized(tmp_path / family)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)
    assert tok is None


def test_unknown_architecture_is_a_clear_error():
    from lowbit.errors import UserError
    from lowbit.models.adapters import decoder_layers

    with pytest.raises(UserError, match="cannot find its decoder blocks"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_eval_json_cli(tmp_path, embedded):
    import subprocess
    import sys

    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "quantize", "smollm2-135m", "--method", "rtn",
                        "--scheme", "w4a16-g64", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "eval", str(out), "--baseline", "smollm2-135m",
                        "--seq-len", "128", "--max-windows", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"perplexity", "kl_divergence", "top1_agreement", "tokens", "model_bytes"} <= set(res)
    assert res["tokens"] == 2 * 127 and 0 < res["kl_divergence"] and 0 < res["top1_agreement"] < 1
    assert res["model_bytes"] < 0.5 * 269e6


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "smollm2-135m", "--scheme", "w4a16-g0", "--out", "x"], "group size"),
    (["quantize", "/no/such/model", "--out", "x"], "not found"),
    (["eval", "smollm2-135m", "--text", "/no/such.txt"], "neither 'wiki' nor an existing file"),
    (["quantize", "smollm2-135m", "--out", "/proc/lowbit-out"], "not writable"),
    (["quantize", "smollm2-135m", "--method", "rtn", "--out", "/etc"], "was not written by lowbit"),
    (["quantize", "smollm2-135m", "--out", "x", "--format", "gguf"], "--format needs --export-out"),
    (["export", "smollm2-135m", "--format", "gptq", "--out", "x"], "reads a lowbit output"),
    (["import", "/etc", "--out", "x"], "not a GGUF file"),
])
def test_cli_user_errors_are_one_line(argv, msg, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_true_sequential_stages_follow_the_call_order(fresh_model, wiki_windows):
    from lowbit.quantization.runner import BlockInputs, sequential_stages

    calib, _ = wiki_windows
    block = fresh_model.model.layers[0]
    mods = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    stages = sequential_stages(block, mods, BlockInputs.capture(fresh_model, calib[:2], 2))
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("scheme", ["q4_1", "int3-g64-asym-mse"])
def test_gptq_lowers_the_output_error_of_rtn_for_every_zero_domain(scheme):
    from lowbit.algorithms.gptq import gptq
    from lowbit.core.tensor import quantize_tensor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3  # correlated inputs
    w = torch.randn(64, 128, generator=g)
    H = x.t() @ x / x.shape[0]
    err = lambda qt: float(((qt.dequantize() - w) @ x.t()).pow(2).mean())  # noqa: E731
    q = gptq(w, H, make_recipe(scheme, "gptq").scheme)
    assert q.scheme.float_zero == (scheme == "q4_1")
    assert err(q) < 0.8 * err(quantize_tensor(w, scheme))
