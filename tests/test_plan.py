"""The planner reproduces worked figures and lowbit's own saved bytes exactly."""
import json
import subprocess
import sys

import pytest

from lowbit.core.scheme import Recipe, Scheme
from lowbit.plan.devices import CATALOG
from lowbit.plan.planner import Arch, PlanInput, arch_from_hf_config, kv_cache_bytes, plan, read_model, weight_bytes

LLAMA3_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)


def test_8b_at_4_bits_group_128():
    arch = Arch(**LLAMA3_8B, params_override=8_000_000_000)
    b = weight_bytes(arch, Recipe(scheme=Scheme.parse("w4a16-g128")))
    assert b["weight_bytes"] == pytest.approx(4.0e9, rel=1e-6)   # 0.5 byte per weight
    assert b["scale_bytes"] == pytest.approx(0.125e9, rel=1e-3)  # one fp16 per 128 weights


def test_llama3_8b_kv_cache_is_1_gib_per_sequence_at_8k():
    arch = Arch(**LLAMA3_8B)
    assert kv_cache_bytes(arch, 8192, 1, "fp16") == 1024**3
    assert kv_cache_bytes(arch, 8192, 1, "fp8") < 0.52 * 1024**3  # half, plus per-(token, head) scales


@pytest.mark.parametrize("scheme,gb", [(None, 140), ("w8a16", 70), ("w4a16", 35)])
def test_70b_at_16_8_4_bits(scheme, gb):
    arch = Arch(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256,
                params_override=70_000_000_000)
    b = weight_bytes(arch, Recipe(scheme=Scheme.parse(scheme)) if scheme else None)
    assert sum(b.values()) / 1e9 == pytest.approx(gb, rel=0.01)


def test_real_llama3_8b_architecture_counts():
    arch = Arch(**LLAMA3_8B)
    assert arch.parameters == pytest.approx(8.03e9, rel=0.002)  # Llama-3-8B: 8.03B, untied


def test_fit_fleet_and_suggestions():
    arch = Arch(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256)
    p = plan(PlanInput(arch=arch, scheme=None, recipe=None, device=CATALOG["h100-sxm"], batch=8, seq_len=8192, replicas=3))
    assert p.fits and p.tensor_parallel == 4 and p.fleet_gpus == 12  # 141 GB of fp16 weights need 4 x 56 GB usable
    # 4-bit weights (~40 GB with fp16 embeddings/lm_head) + 21.5 GB of KV for 8 x 8192 tokens: still TP=2
    q = plan(PlanInput(arch=arch, scheme=Scheme.parse("w4a16-g128"), recipe=None, device=CATALOG["h100-sxm"], batch=8, seq_len=8192))
    assert q.tensor_parallel == 2 and q.saved_vs_fp16_percent > 50
    assert q.kv_cache_bytes == 80 * 8 * 128 * 2 * 8192 * 8 * 2
    one = plan(PlanInput(arch=arch, scheme=Scheme.parse("w4a16-g128"), recipe=None, device=CATALOG["h100-sxm"], batch=1, seq_len=8192))
    assert one.tensor_parallel == 1
    assert q.roofline["decode_tokens_per_s"] > 2.5 * p.roofline["decode_tokens_per_s"] / p.tensor_parallel
    tight = plan(PlanInput(arch=arch, scheme=None, recipe=None, device=CATALOG["l4"], max_gpus_per_replica=2))
    assert not tight.fits and tight.shortfall_bytes > 0
    assert any("GPUs per replica would fit" in s for s in tight.suggestions)


def test_fp8_is_native_only_on_hopper_and_newer():
    arch = Arch(**LLAMA3_8B)
    for dev, native in [("a100-80gb", False), ("h100-sxm", True), ("b200", True)]:
        p = plan(PlanInput(arch=arch, scheme=Scheme.parse("fp8"), recipe=None, device=CATALOG[dev]))
        assert p.roofline["native_format"] is native


def test_prediction_equals_saved_bytes_exactly(tmp_path, embedded):
    import copy

    from lowbit.api import make_recipe, quantize
    from lowbit.io.files import read_safetensors
    from lowbit.io.lowbit_dir import save_quantized

    model, tok = embedded
    for scheme in ["w4a16-g128-asym", "w3a16-g64"]:  # 576 = 4 x 128 + 64: a short last group
        res = quantize(copy.deepcopy(model), recipe=make_recipe(scheme, "rtn"), progress=False)
        out = save_quantized(res.model, tok, tmp_path / scheme, res.info)
        tensors, _ = read_safetensors(out / "model.safetensors")
        saved = sum(t.numel() * t.element_size() for t in tensors.values())
        arch, recipe = read_model(str(out))
        b = weight_bytes(arch, recipe)
        assert b["weight_bytes"] + b["scale_bytes"] + b["float_bytes"] == saved
        assert b["weight_bytes"] + b["scale_bytes"] == sum(m.qweight.nbytes for m in res.model.modules() if hasattr(m, "qweight"))


def test_gguf_and_config_agree_on_the_embedded_model():
    from lowbit.models.load import embedded_dir, embedded_gguf

    a = read_model(str(embedded_gguf("smollm2-135m")))[0]
    b = read_model(str(embedded_dir("smollm2-135m") / "config.json"))[0]
    assert (a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.vocab, a.tied) == \
           (b.layers, b.hidden, b.heads, b.kv_heads, b.head_dim, b.intermediate, b.vocab, b.tied) == \
           (30, 576, 9, 3, 64, 1536, 49152, True)
    assert a.parameters == pytest.approx(134.5e6, rel=0.001)


def test_hf_config_families():
    gpt2 = arch_from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert not gpt2.gated_mlp and gpt2.tied and gpt2.parameters == pytest.approx(124e6, rel=0.05)


def test_plan_cli_json_and_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit", "plan", "8e9", "--layers", "32", "--hidden", "4096", "--heads", "32",
                        "--kv-heads", "8", "--scheme", "w4a16-g128", "--json", "--compare", "w8a16,fp8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"parameters", "weight_bytes", "scale_bytes", "kv_cache_bytes", "gpus_per_replica", "fleet_gpus", "fits"} <= set(out)
    assert [row["scheme"] for row in out["decision_matrix"]] == ["fp16", "w8a16", "fp8"]
    r = subprocess.run([sys.executable, "-m", "lowbit", "plan", "8e9", "--gpu", "tpu-v9"], capture_output=True, text=True)
    assert r.returncode == 2 and "--layers" in r.stderr
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    r = subprocess.run([sys.executable, "-m", "lowbit", "plan", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr


# public configs (the fields the planner reads), as their model cards publish them
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                "vocab_size": 32000, "tie_word_embeddings": False}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
               "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "vocab_size": 129280, "tie_word_embeddings": False}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "vocab_size": 151936, "tie_word_embeddings": False}
OLMOE_1B_7B = {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
               "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
               "vocab_size": 50304, "tie_word_embeddings": False}


@pytest.mark.parametrize("cfg, total, active", [
    (MIXTRAL_8X7B, 46.7e9, 12.9e9), (DEEPSEEK_V3, 671e9, 37.5e9), (QWEN3_30B_A3B, 30.5e9, 3.3e9), (OLMOE_1B_7B, 6.9e9, 1.3e9)])
def test_mixture_of_experts_total_and_active_parameters(cfg, total, active):
    """The model cards' totals (memory) and active counts (decode bytes and FLOPs per token)."""
    arch = arch_from_hf_config(cfg)
    assert arch.parameters == pytest.approx(total, rel=0.005)
    assert arch.active_parameters == pytest.approx(active, rel=0.02)


def test_mixtral_memory_follows_all_experts_and_decode_only_the_routed_ones(tmp_path):
    arch = arch_from_hf_config(MIXTRAL_8X7B)
    p = plan(PlanInput(arch=arch, scheme=None, recipe=None, device=CATALOG["h100-sxm"], batch=1, seq_len=4096))
    assert p.weight_bytes == 0 and p.float_bytes == pytest.approx(2 * 46.7e9, rel=0.005)  # every expert is stored
    assert not p.fits or p.tensor_parallel >= 2  # 93 GB of fp16 weights: not on one 80 GB card
    # batch 1 reads the dense parts and 2 of 8 experts per layer: ~12.9B parameters' bytes
    assert p.roofline["decode_weight_bytes_per_step"] == pytest.approx(2 * 12.9e9, rel=0.01)
    big = plan(PlanInput(arch=arch, scheme=None, recipe=None, device=CATALOG["h100-sxm"], batch=64, seq_len=1024))
    assert big.roofline["decode_weight_bytes_per_step"] == pytest.approx(p.float_bytes, rel=0.01)  # 64 tokens reach every expert
    q = weight_bytes(arch, Recipe(scheme=Scheme.parse("w4a16-g128")))
    assert q["weight_bytes"] == pytest.approx(0.5 * (46.7e9 - 0.262e9 - 32 * 8 * 4096), rel=0.002)  # router, embeddings stay float
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(MIXTRAL_8X7B))
    r = subprocess.run([sys.executable, "-m", "lowbit", "plan", str(cfg), "--scheme", "w4a16-g128"], capture_output=True, text=True)
    assert r.returncode == 0 and "46.703B parameters (12.880B active per token)" in r.stdout, r.stdout + r.stderr
