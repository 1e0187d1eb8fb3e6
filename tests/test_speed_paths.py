"""The fast (bf16, packed-kernel) model agrees with the reference path on the real model,
and the bench / generate commands run end to end."""
import copy
import json
import subprocess
import sys

import torch

from lowbit.api import make_recipe, quantize
from lowbit.core.scheme import Scheme
from lowbit.evaluate.bench import end_to_end, gemv_bench, ratio_by_round, round_robin
from lowbit.runtime.generate import generate
from lowbit.runtime.kernels import native
from lowbit.runtime.qlinear import QuantLinear


def test_kernel_model_agrees_with_reference_model(embedded, wiki_windows):
    base, _ = embedded
    recipe = make_recipe("w4a16-g64-asym", "rtn")
    recipe.overrides["lm_head"] = Scheme.parse("w8a16")
    q = quantize(copy.deepcopy(base), recipe=recipe, progress=False, float_dtype=torch.bfloat16).model
    assert not q.config.tie_word_embeddings  # the head is its own int8 tensor now
    fast = q.to(torch.bfloat16)
    kinds = {m.kernel_name for m in fast.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({"lowbit-int4", "lowbit-int8"} if native.available() else {"int4pack", "int8pack"})
    ids = wiki_windows[1][:1, :128]
    with torch.no_grad():
        lp_fast = torch.log_softmax(fast(ids).logits.float(), -1)
        QuantLinear.policy = "reference"
        try:
            lp_ref = torch.log_softmax(fast(ids).logits.float(), -1)
        finally:
            QuantLinear.policy = "auto"
    agree = (lp_fast.argmax(-1) == lp_ref.argmax(-1)).float().mean()
    kl = (lp_ref.exp() * (lp_ref - lp_fast)).sum(-1).mean()
    assert agree > 0.95 and kl < 0.01  # the same model up to bf16 rounding of scales and sums


def test_static_cache_generation_matches_full_forward(embedded):
    base, tok = embedded
    m = copy.deepcopy(base)
    m.set_attn_implementation("eager")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    g = generate(m, ids, 8, engine="transformers")
    full = torch.cat([ids, g["tokens"]], 1)
    with torch.no_grad():
        logits = m(full).logits
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), g["tokens"])


def test_gemv_bench_reports_roof_fractions():
    rows = gemv_bench([(256, 512)], roof_gb_s=10.0, min_bytes=1 << 20, variants=["fp32", "int4pack", "naive"])
    assert {r["variant"] for r in rows} == {"fp32", "int4-g128 int4pack bf16", "int4-g128 naive dequant+matmul bf16"}
    for r in rows:
        assert r["us_per_call"] > 0 and abs(r["percent_of_roof"] - 10 * r["gb_per_s"]) < 1e-6


def test_round_robin_interleaves_and_ratios_pair_rounds():
    calls = []
    got = round_robin({"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)}, 3)
    assert calls == ["a", "b"] * 3 and got == {"a": [1, 3, 5], "b": [2, 4, 6]}
    r = ratio_by_round([2.0, 3.0, 8.0], [1.0, 2.0, 2.0])
    assert r == {"median": 2.0, "min": 1.5, "max": 4.0, "by_round": [2.0, 1.5, 4.0]}


def test_end_to_end_times_peers_in_the_same_rounds(embedded):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = embedded
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    tiny = LlamaForCausalLM(cfg).eval()
    order, peer_rate = [], iter([10.0, 30.0, 20.0])

    def peer():
        order.append("peer")
        return {"decode_tokens_per_s": next(peer_rate), "prefill_tokens_per_s": 5.0}

    tiny.register_forward_pre_hook(lambda *_: order.append("model"))
    out = end_to_end({"tiny": tiny}, tok, new_tokens=3, prompt_lens=(4,), rounds=3, peers={"peer": peer})
    assert order.count("peer") == 3 and order[-1] == "peer"  # one call per round, after the model's
    peer_at = [i for i, who in enumerate(order) if who == "peer"]
    assert all(order[i + 1] == "model" for i in peer_at[:-1])  # the model ran again between them
    assert out["peer"] == {"decode_tokens_per_s": 20.0, "decode_tokens_per_s_rounds": [10.0, 30.0, 20.0],
                           "prefill_tokens_per_s": 5.0, "prefill_tokens_per_s_rounds": [5.0] * 3}
    t = out["tiny"]
    assert len(t["decode_tokens_per_s_rounds"]) == 3 and t["decode_tokens_per_s"] == sorted(t["decode_tokens_per_s_rounds"])[1]


def test_bench_and_generate_cli():
    r = subprocess.run([sys.executable, "-m", "lowbit", "bench", "smollm2-135m", "--scheme", "w4a16-g64", "--tokens", "4",
                        "--prompt-lens", "8", "--no-micro", "--json", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["roof_gb_per_s"] > 0 and res["read_roof_gb_per_s"] > 0
    caches = res["host"]["caches"]  # the sweeps outsize the last-level cache whatever the host
    assert res["cold_bytes"] >= max(256 << 20, 4 * max(caches.values(), default=0))
    assert {"fp32", "bf16", "fp16", "w4a16-g64 +int8 lm_head"} <= set(res["variants"])
    for v in res["variants"].values():
        assert v["decode_tokens_per_s"] > 0 and v["prefill_tokens_per_s"] == v["prefill_tokens_per_s_by_len"]["8"] > 0
    r = subprocess.run([sys.executable, "-m", "lowbit", "generate", "smollm2-135m", "--prompt", "Paris is", "--max-new-tokens", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("Paris is") and "tok/s" in r.stderr


def test_lowbit_attention_matches_eager_with_gqa_and_masks():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lowbit.runtime.attention import lowbit_attention

    torch.manual_seed(0)
    b, h, kvh, q, kv, d = 2, 6, 2, 3, 10, 16
    query, key, value = torch.randn(b, h, q, d), torch.randn(b, kvh, kv, d), torch.randn(b, kvh, kv, d)
    visible = torch.ones(b, 1, q, kv, dtype=torch.bool)
    visible[..., 7:] = False                          # unused static-cache slots
    visible[1, :, :, :2] = False                      # left padding in one sequence
    visible[:, :, 0, 6] = False                       # causal: the first query sees one fewer
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = h // kvh, False
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    for dt in (torch.float32, torch.bfloat16):
        ref, _ = eager_attention_forward(module, query.to(dt), key.to(dt), value.to(dt), additive.to(dt), 0.25)
        out, _ = lowbit_attention(module, query.to(dt), key.to(dt), value.to(dt), visible, 0.25)
        assert out.dtype == dt and out.shape == (b, q, h, d)
        torch.testing.assert_close(out.float(), ref.float(), **({} if dt == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}))


def test_static_cache_generation_with_lowbit_attention(embedded):
    from lowbit.runtime.attention import register

    base, tok = embedded
    m = copy.deepcopy(base)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    m.set_attn_implementation(register())
    g = generate(m, ids, 8, engine="transformers")
    m.set_attn_implementation("eager")
    with torch.no_grad():
        logits = m(torch.cat([ids, g["tokens"]], 1)).logits
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), g["tokens"])


def test_lowbit_attention_without_mask_is_causal():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lowbit.runtime.attention import lowbit_attention

    torch.manual_seed(1)
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    causal = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))[None, None]
    ref, _ = eager_attention_forward(module, query, key, value, causal, 0.3)
    torch.testing.assert_close(lowbit_attention(module, query, key, value, None, 0.3)[0], ref)
