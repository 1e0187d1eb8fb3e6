"""Mixture-of-experts models: fused 3-D experts become one Linear per expert projection, every
expert is quantized (or the run says which weight it cannot), calibrated on the tokens the
router sends it, saved and reloaded; the planner counts total and active parameters."""
import copy
import subprocess
import sys

import pytest
import torch
import transformers as T
from torch import nn

import lowbit
from lowbit.errors import UserError
from lowbit.io.lowbit_dir import load_quantized
from lowbit.models.moe import RoutedExperts, unfuse_experts
from lowbit.runtime.qlinear import QuantLinear

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                          head_dim=16, **COMMON),
    # shared expert, a dense first layer, multi-head latent attention
    "deepseek_v3": lambda: T.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                                              num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                              **{**COMMON, "num_key_value_heads": 4}),
    # [experts, in, out] weights with biases, interleaved gate/up, a clamped GLU
    "gpt_oss": lambda: T.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                      layer_types=["sliding_attention", "full_attention"], **COMMON),
}


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "experts" in name or name.endswith("bias"):  # some families initialise these to zero or leave them empty
                p.normal_(0, 0.05)
    return m


def _ids(n=8, t=32, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _kl(p_logits, q_logits) -> float:
    return float(torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean())


def _expert_params(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if "experts." in n and p.dim() == 3)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_per_expert_linears_compute_what_the_fused_experts_compute(family):
    m = tiny(family)
    ids = _ids()
    with torch.no_grad():
        ref = m(ids).logits
        u = copy.deepcopy(m)
        assert unfuse_experts(u) >= 1
        assert torch.allclose(u(ids).logits, ref, atol=1e-5)
    assert not any(p.dim() == 3 for p in u.parameters())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_expert_quantized_w8_close_to_float_and_reload_bit_identical(family, tmp_path):
    m = tiny(family)
    ids = _ids()
    with torch.no_grad():
        ref = m(ids).logits
    expert_params = _expert_params(m)
    res = lowbit.quantize(copy.deepcopy(m), "w8a16", "rtn", progress=False, out=tmp_path / "q")
    q = res.model
    quantized_expert = sum(mod.layer.shape[0] * mod.layer.shape[1] for n, mod in q.named_modules()
                           if isinstance(mod, QuantLinear) and ".experts." in n)
    assert quantized_expert >= 0.99 * expert_params
    assert not any(isinstance(mod, RoutedExperts) and any(isinstance(c, nn.Linear) for c in mod.modules()) for mod in q.modules())
    with torch.no_grad():
        out = q(ids).logits
        assert _kl(ref, out) < 0.01
        back, _, meta = load_quantized(tmp_path / "q")
        assert torch.equal(back(ids).logits, out)
    routers = [n for n in meta["modules"] if n.endswith((".gate", ".router"))]
    assert routers == []  # routers stay float by default


def _routed_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{expert Linear name: the inputs it received} on the float model with per-expert Linears."""
    seen: dict[str, list] = {}
    hooks = [mod.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and ".experts." in n]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_gptq_per_expert_output_error_below_rtn_on_routed_inputs(family):
    m = tiny(family)
    calib = _ids(16, 32, seed=2)
    u = copy.deepcopy(m)
    unfuse_experts(u)
    inputs = _routed_inputs(u, calib)
    weights = {n: mod.weight.detach().clone() for n, mod in u.named_modules() if n in inputs}
    err = {}
    for method in ("rtn", "gptq"):
        res = lowbit.quantize(copy.deepcopy(m), "w3a16-g32", method, progress=False, calib_ids=calib, batch_size=4)
        mods = dict(res.model.named_modules())
        err[method] = sum(float(((x @ weights[n].t() - x @ mods[n].layer.effective_weight().t()) ** 2).sum())
                          for n, x in inputs.items() if n.endswith("up_proj"))
        if method == "gptq":
            tokens = res.info["expert_tokens"]
            assert tokens["max"] > 0 and len(tokens["per_expert"]) == 2 * 4
            assert sum(tokens["per_expert"].values()) == 2 * 16 * 32 * 2  # every token reaches top-2 experts in each of 2 layers
    assert err["gptq"] < err["rtn"]


def test_a_weight_that_would_stay_float_is_an_error_naming_it():
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    m.model.layers[1].mlp.extra = nn.Module()
    m.model.layers[1].mlp.extra.weight = nn.Parameter(torch.randn(64, 64))  # not a Linear: nothing would quantize it
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.extra\.weight .* would stay float"):
        lowbit.quantize(copy.deepcopy(m), "w4a16-g32", "rtn", progress=False)
    res = lowbit.quantize(m, "w4a16-g32", "rtn", progress=False, exclude=["lm_head", "*embed*", "*.extra"])
    assert 0.5 < res.info["quantized_weight_fraction"] < 1


def test_cli_quantizes_a_saved_mixtral_checkpoint(tmp_path):
    """The checkpoint as save_pretrained writes it (experts under their on-disk names): the default
    run loads it whole (MoE checkpoints do not stream yet) and quantizes every expert: 2 x (4 attention + 4 x 3 expert) Linears."""
    hf = tmp_path / "mix"
    tiny("mixtral").save_pretrained(hf)
    T.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()).save_pretrained(hf)
    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "quantize", str(hf), "--method", "rtn", "--scheme", "w4a16-g32",
                        "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "quantized 32 Linear layers" in r.stdout and "% of weight-matrix parameters quantized" in r.stdout, r.stdout
    with pytest.raises(UserError, match="mixture-of-experts checkpoint quantizes in memory"):
        lowbit.quantize(str(hf), "w4a16-g32", "rtn", progress=False, out=tmp_path / "s", stream=True)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(255)} | {"[UNK]": 255}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])  # gguf writes them: tests/test_llamacpp.py
def test_exports_say_they_do_not_carry_experts_yet(fmt, tmp_path):
    from lowbit.io.interop import export_model

    res = lowbit.quantize(tiny("qwen3_moe"), "w4a16-g32", "rtn", progress=False)
    with pytest.raises(UserError, match=f"the {fmt} export of mixture-of-experts layers is not written yet"):
        export_model(res.model, None, fmt, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_experts_run_only_the_routed_ones_bf16_kernels_and_fp32_reference(tmp_path):
    lowbit.quantize(tiny("mixtral"), "w4a16-g64", "rtn", progress=False, out=tmp_path / "q")
    ref, _ = lowbit.load(str(tmp_path / "q"), torch.float32)
    fast, _ = lowbit.load(str(tmp_path / "q"), torch.bfloat16)
    calls = []
    for n, mod in fast.named_modules():
        if isinstance(mod, QuantLinear) and ".experts." in n:
            mod.register_forward_hook(lambda mod, inp, out, n=n: calls.append(n))
    with torch.no_grad():
        fast(_ids(1, 1))
    assert len(calls) == 2 * 2 * 3  # one token: top-2 experts x 2 layers x gate/up/down
    with torch.no_grad():
        a, b = ref(_ids()).logits, fast(_ids()).logits.float()
    assert _kl(a, b) < 0.01
