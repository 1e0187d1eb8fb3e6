"""lowbit's decode loop (decode.py) against transformers' forward: tiny random models of
every family it runs (GQA, q/k/v biases, q/k norms), chunked prefill, the embedded model
quantized, and the cases it must refuse."""
import copy

import pytest
import torch

from lowbit.api import make_recipe, quantize
from lowbit.core.scheme import Scheme
from lowbit.errors import UserError
from lowbit.runtime.decode import Decoder
from lowbit.runtime.generate import decode_engine, generate

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def _tiny(family: str):
    import transformers

    cfg_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0,
                  "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        # every other layer dense (mlp_only_layers), q/k norms
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                                                "moe_intermediate_size": 48, "mlp_only_layers": [1]}),
    }[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**TINY, **extra)).eval()
    for p in model.parameters():  # norms and biases away from their init so a mistake shows
        if p.dim() == 1:
            p.data.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_decoder_matches_transformers_forward(family):
    model = _tiny(family)
    if family in ("mixtral", "qwen3_moe"):  # the experts as lowbit holds them, quantized: RoutedExperts of QuantLinears
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "experts" in n:
                    p.normal_(0, 0.05)
        model = quantize(model, recipe=make_recipe("w8a16-g32", "rtn"), progress=False).model
        assert "RoutedExperts" in {type(m).__name__ for m in model.modules()}
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if family == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0]
    d = Decoder(model, 16)
    torch.testing.assert_close(d.forward(ids), ref[-1], atol=1e-4, rtol=1e-4)
    d.reset()  # the same positions fed as a 5-token chunk, a 4-token chunk, then one at a time
    out = [d.forward(ids[:, :5]), d.forward(ids[:, 5:9])] + [d.forward(ids[:, i:i + 1]) for i in range(9, 12)]
    torch.testing.assert_close(torch.stack(out), ref[[4, 8, 9, 10, 11]], atol=1e-4, rtol=1e-4)


def test_engines_generate_the_same_tokens(embedded):
    base, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    a = generate(base, ids, 12, engine="lowbit", time_linears=True)
    b = generate(base, ids, 12, engine="transformers")
    assert a["engine"] == "lowbit" and torch.equal(a["tokens"], b["tokens"])
    assert 0 < a["decode_linear_seconds"] < a["decode_seconds"]


def test_decoder_runs_the_quantized_kernels(embedded, wiki_windows):
    """bf16 W4 model: the decoder (fp32 rotary and KV cache) and transformers' forward
    (bf16 throughout) are the same model up to bf16 rounding."""
    base, _ = embedded
    recipe = make_recipe("w4a16-g64", "rtn")
    recipe.overrides["lm_head"] = Scheme.parse("w8a16")
    q = quantize(copy.deepcopy(base), recipe=recipe, progress=False, float_dtype=torch.bfloat16).model.to(torch.bfloat16)
    ids = wiki_windows[1][:1, :48]
    with torch.no_grad():
        ref = torch.log_softmax(q(ids).logits[0].float(), -1)
    d = Decoder(q, 48)
    out = torch.stack([torch.log_softmax(d.forward(ids[:, i:i + 1]).float(), -1) for i in range(48)])
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean()
    assert kl < 0.01 and agree > 0.9


def test_decoder_refusals(embedded):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert decode_engine(gpt2) == "transformers"
    with pytest.raises(UserError, match="model type 'gpt2'"):
        Decoder(gpt2, 8)
    g = generate(gpt2, torch.tensor([[1, 2, 3]]), 3)  # auto falls back to transformers' loop
    assert g["engine"] == "transformers" and g["tokens"].shape == (1, 3)
    base, _ = embedded
    d = Decoder(base, 4)
    with pytest.raises(UserError, match="holds 4 positions"):
        d.forward(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(UserError, match="batch 1"):
        d.forward(torch.tensor([[1, 2], [3, 4]]))
    mistral = _tiny("mistral")
    mistral.config.sliding_window = 8
    with pytest.raises(UserError, match="sliding window"):
        Decoder(mistral, 16)


@pytest.mark.parametrize("family,scheme,gemv_act", [("llama", "w4a16-g32", "bf16"), ("qwen2", "w4a16-g64-asym", "bf16"),
                                                    ("qwen3", "w8a16", "bf16"), ("mistral", None, "bf16"),
                                                    ("llama-odd", None, "bf16"), ("llama-wide", "w8a16", "bf16"),
                                                    ("llama", "w4a16-g32", "int8"), ("qwen2", "w4a16-g64-asym", "int8"),
                                                    ("qwen3", "w8a16", "int8")])
def test_native_step_matches_the_loop(family, scheme, gemv_act, native_isa, monkeypatch):
    """Single tokens through the C++ layer step (decode_step.cpp) against the Python loop on
    the same bf16 model: int4 (symmetric, affine), int8 and dense bf16 projections, q/k/v
    biases, q/k norms, on each kernel build, and with the GEMVs' int8 activations
    (LOWBIT_GEMV_ACT=int8, avx512 build), which the step and the loop must both take. Only
    fp32 summation order differs, so bf16 roundings rarely flip. llama-wide: an int8 down_proj
    wider than lowbit's int8 GEMV is fast on, which the step hands to int8pack as QuantLinear does."""
    import transformers

    from lowbit.runtime.decode import _native_proj
    from lowbit.runtime.kernels import native

    if gemv_act == "int8" and native_isa != "avx512":
        pytest.skip("int8 activations: the avx512 build's GEMV")
    monkeypatch.setenv("LOWBIT_GEMV_ACT", gemv_act)

    cfg = dict(TINY, intermediate_size=128)
    # llama-odd: widths that are not multiples of the step's 8-wide loops (their scalar tails)
    extra = {"qwen3": {"head_dim": 32}, "mistral": {"sliding_window": None},
             "llama-odd": {"hidden_size": 44, "intermediate_size": 100, "num_attention_heads": 2,
                           "num_key_value_heads": 1},
             "llama-wide": {"intermediate_size": native.int8_gemv_max_k() + 64}}.get(family, {})
    torch.manual_seed(0)
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}.get(family, "Llama")
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**{**cfg, **extra})).eval()
    for p in model.parameters():
        if p.dim() == 1:
            p.data.add_(0.3 * torch.randn_like(p))
    if scheme is not None:
        model = quantize(model, recipe=make_recipe(scheme, "rtn"), progress=False, float_dtype=torch.bfloat16).model
    model = model.to(torch.bfloat16)
    fast, loop = Decoder(model, 24), Decoder(model, 24, native=False)
    assert fast.step is not None and loop.step is None
    if family == "llama-wide":
        mlp = model.model.layers[0].mlp
        kernels = [_native_proj(native.module(), m).kernel for m in (mlp.up_proj, mlp.down_proj)]
        assert kernels == ["lowbit-int8", "int8pack"]
    assert native.gemv_act_int8() == (gemv_act == "int8")
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    a = torch.stack([fast.forward(i) for i in ids[0, :, None]]).float()
    b = torch.stack([loop.forward(i) for i in ids[0, :, None]]).float()
    ulp = b.abs().max().item() / 128  # one bf16 rounding step at the largest logit
    torch.testing.assert_close(fast.k_cache, loop.k_cache, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=ulp, rtol=0)
    fast.reset()  # greedy picks (generate's path): the step's argmax of those same logits
    picks = torch.cat([fast.next_token(i) for i in ids[0, :, None]]).view(-1)
    assert torch.equal(picks, a.argmax(-1))
    if gemv_act == "int8":  # the step took the setting: its logits differ from bf16 activations'
        monkeypatch.setenv("LOWBIT_GEMV_ACT", "bf16")
        exact = Decoder(model, 24)
        assert not torch.equal(a, torch.stack([exact.forward(i) for i in ids[0, :, None]]).float())
        monkeypatch.setenv("LOWBIT_GEMV_ACT", gemv_act)
    # after a prompt through the loop (t > 1), single tokens continue in C++ on the same cache
    fast.reset()
    torch.testing.assert_close(torch.stack([fast.forward(ids[:, :12])] + [fast.forward(ids[:, i:i + 1]) for i in range(12, 20)]).float(),
                               b[11:], atol=ulp, rtol=0)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 49152])
def test_native_argmax_is_torch_argmax(n, native_isa):
    """The decode step's greedy pick (decode_step.cpp: integer keys, blocks of 64), in each
    build, against torch.argmax: random logits, ties (the first wins), -0 beside +0, all -inf,
    NaN (largest)."""
    from lowbit.runtime.kernels import native

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).bfloat16()
    cases = [x, x.round(), torch.zeros(n).bfloat16(), torch.full((n,), float("-inf")).bfloat16(), -x.abs()]
    signed_zeros = torch.zeros(n)
    signed_zeros[::2] = -0.0
    cases.append(signed_zeros.bfloat16())
    for v in (float("nan"), float("inf")):
        y = x.clone()
        y[torch.randint(0, n, (2,), generator=g)] = v
        cases.append(y)
    for c in cases:
        assert native.module().argmax(c) == c.argmax().item()
    with pytest.raises(RuntimeError, match="1-D bf16"):
        native.module().argmax(x.float())


def test_native_step_leaves_models_it_cannot_run_to_the_loop(embedded):
    from lowbit.runtime.kernels import native

    if not native.available():
        pytest.skip("lowbit's native kernels are not built on this CPU")
    base, _ = embedded
    assert Decoder(base, 8).step is None  # fp32 activations: the loop (exact numerics for quality runs)
    q = quantize(_tiny("mixtral"), recipe=make_recipe("w8a16-g32", "rtn"), progress=False).model.to(torch.bfloat16)
    assert Decoder(q, 8).step is None  # mixture-of-experts blocks run their router in Python
