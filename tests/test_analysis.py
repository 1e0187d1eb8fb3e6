"""lowbit analyze: streaming statistics against hand-computed values, the outlier and
persistence rules on injected channels, the studies' invariants, and the report."""
import json
import math

import pytest
import torch
from torch import nn

from lowbit.analysis.collect import ActivationCollector, linear_kind
from lowbit.analysis.outliers import outlier_channels, persistence
from lowbit.analysis.probes import edit_distance, first_divergence, load_probes
from lowbit.analysis.stats import ChannelStats, TokenStats
from lowbit.analysis.studies import clipping_curve, error_vs_bits, metadata_overhead, sym_vs_affine
from lowbit.cli.parser import main
from lowbit.core.qparams import fake_quantize
from lowbit.core.tensor import quantize_tensor


def test_channel_stats_match_hand_computed_values():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [5.0, 0.0], [7.0, 2.0]])
    st = ChannelStats(2)
    st.update(x[:1])
    st.update(x[1:])  # streamed in two batches
    for j in range(2):
        col = [float(v) for v in x[:, j]]
        n = len(col)
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n
        m4 = sum((v - mean) ** 4 for v in col) / n
        assert st.mean[j].item() == pytest.approx(mean)
        assert st.std[j].item() == pytest.approx(math.sqrt(var))
        assert st.kurtosis[j].item() == pytest.approx(m4 / var ** 2)
        assert st.absmax[j].item() == max(abs(v) for v in col)
    # column 0 is 1,3,5,7: var 5, m4 = (81+1+1+81)/4 = 41 -> kurtosis 1.64
    assert st.kurtosis[0].item() == pytest.approx(41 / 25)


def test_channel_stats_gaussian_kurtosis_is_three_and_merge_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 3, generator=g)
    a, b, whole = ChannelStats(3), ChannelStats(3), ChannelStats(3)
    a.update(x[:70_000])
    b.update(x[70_000:])
    whole.update(x)
    m = a.merge(b)
    assert torch.allclose(m.kurtosis, whole.kurtosis) and torch.equal(m.absmax, whole.absmax)
    assert torch.allclose(whole.kurtosis, torch.full((3,), 3.0, dtype=torch.float64), atol=0.05)


def test_token_stats_separate_the_first_token():
    x = torch.ones(2, 5, 4)
    x[:, 0, 1] = 50.0  # attention-sink-like first token
    x[1, 3, 2] = -8.0
    ts = TokenStats()
    a = ts.update(x)
    assert a.tolist() == [[50, 1, 1, 1, 1], [50, 1, 1, 8, 1]]
    s = ts.summary()
    assert s["first_token_mean_absmax"] == 50 and s["other_tokens_mean_absmax"] == pytest.approx(15 / 8)
    assert s["max_absmax"] == 50 and s["tokens"] == 10
    assert 0.8 < s["median_absmax"] < 1.25  # histogram bin around 1


def test_outlier_rule_is_relative_to_the_median_channel():
    a = torch.ones(10)
    a[3], a[7] = 6.0, 5.9
    assert outlier_channels(a) == [3]
    assert outlier_channels(a * 1000) == [3]  # scale-free
    assert outlier_channels(torch.zeros(4)) == []


class _TinyLM(nn.Module):
    """A 'model' whose block-0 input is set by the test: model.layers[0] has q/k/v and down."""

    def __init__(self, channels=32):
        super().__init__()
        block = nn.Module()
        block.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(block.self_attn, n, nn.Linear(channels, channels, bias=False))
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([block])
        self.next_input = None

    def forward(self, input_ids, use_cache=False):
        x = self.next_input(input_ids)
        attn = self.model.layers[0].self_attn
        return attn.q_proj(x) + attn.k_proj(x) + attn.v_proj(x)


def test_injected_persistent_outlier_is_persistent_and_a_random_spike_is_not():
    g = torch.Generator().manual_seed(0)
    model = _TinyLM()
    sets = {f"text {i}": [torch.zeros(2, 16, dtype=torch.long)] for i in range(5)}
    calls = iter(range(5))

    def make_input(ids):
        i = next(calls)
        x = torch.randn(2, 16, 32, generator=g)
        x[..., 5] *= 40.0  # the model's persistent outlier channel: on every text
        if i == 2:
            x[1, 7, 20] = 300.0  # one spike, one token, one text
        return x

    model.next_input = make_input
    col = ActivationCollector(model, sample_blocks=(0,))
    col.run(sets, progress=False)
    col.close()
    assert len(col.sites) == 1  # q/k/v read one tensor: one site
    site = next(iter(col.sites.values()))
    assert site.linears == [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    p = persistence(site.per_set_absmax)
    assert p["persistent"] == [5]
    assert p["transient"] == [20]
    assert p["per_set"][2] == [20, 5] and p["per_set"][0] == [5]
    assert site.chan.n == 5 * 2 * 16
    assert site.act_err["int8 per-tensor"][0] > site.act_err["int8 per-token"][0]
    assert sum(t.shape[0] for t in site.sample) <= 256 + 5


def test_linear_kinds_cover_the_families():
    assert linear_kind("model.layers.3.self_attn.k_proj") == "qkv"
    assert linear_kind("model.layers.3.self_attn.o_proj") == "o"
    assert linear_kind("model.layers.3.mlp.up_proj") == "gate_up"
    assert linear_kind("model.layers.3.mlp.down_proj") == "down"
    assert linear_kind("transformer.h.0.attn.c_attn") == "qkv"
    assert linear_kind("transformer.h.0.mlp.c_proj") == "down"
    assert linear_kind("model.decoder.layers.0.fc1") == "gate_up"


@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g64-asym", "int8-channel", "int4-g32-asym-fzero", "nf4-g64"])
def test_fake_quantize_equals_stored_codes_decoded(scheme):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fake_quantize(w, scheme_parse(scheme)), quantize_tensor(w, scheme).dequantize().float())


def scheme_parse(name):
    from lowbit.core.scheme import Scheme

    return Scheme.parse(name)


def test_studies_invariants():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[:, 3] *= 30
    rows = {(r["bits"], r["granularity"]): r["rel_mse"] for r in error_vs_bits([w], activation=False)}
    for gran in ("tensor", "channel", "g128", "g64", "g32"):
        errs = [rows[(b, gran)] for b in (2, 3, 4, 8)]
        assert errs == sorted(errs, reverse=True)  # more bits, less error
    assert rows[(4, "g32")] < rows[(4, "channel")] < rows[(4, "tensor")]
    silu = torch.nn.functional.silu(torch.randn(128, 256, generator=g) * 2)
    s = sym_vs_affine(silu)
    assert s["min"] >= -0.2785 and all(r["affine"] < r["symmetric"] for r in s["rows"])
    c = clipping_curve(torch.randn(32, 512, generator=g), "int4-channel")
    assert c["best_rel_mse"] <= c["absmax_rel_mse"] and c["best_clip"] < 1.0  # Gaussian tails: clipping pays at 4 bits
    assert c["per_group_search_rel_mse"] <= c["best_rel_mse"] * 1.001
    over = {(r["granularity"], r["affine"]): r["overhead_bits"] for r in metadata_overhead(w)}
    assert over[("g64", False)] == pytest.approx(16 / 64) and over[("g32", True)] == pytest.approx(16 / 32 + 4 / 32)


def test_probe_metrics_and_user_probe_files(tmp_path):
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None and first_divergence([1, 2, 3], [1, 5, 3]) == 1
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x = ", "category": "code"}\n{"prompt": "hi"}\n')
    p = load_probes(str(f))
    assert p["code"][-1] == "x = " and p["user"] == ["hi"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(Exception, match="needs a string field 'prompt'"):
        load_probes(str(bad))


def test_analyze_cli_one_line_errors(tmp_path, capsys):
    assert main(["--quiet", "analyze", "smollm2-135m", "--sets", "1", "--out", str(tmp_path / "r.html")]) == 2
    assert "at least 2 text sets" in capsys.readouterr().err
    assert main(["--quiet", "analyze", "smollm2-135m", "--out", str(tmp_path / "nope" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--quiet", "analyze", "smollm2-135m", "--probe-schemes", "w4a16-g65x", "--out", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_analyze_embedded_model_writes_report_and_json(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["--quiet", "analyze", "smollm2-135m", "--seq-len", "64", "--sets", "2", "--windows", "2",
                 "--probe-schemes", "w4a16-g64-asym", "--new-tokens", "4", "--sensitivity-windows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recommendation:" in printed and "Persistent outlier channels" in printed
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 6 and "What we found" in html and "Task probes" in html
    res = json.loads(out.with_suffix(".json").read_text())
    assert len(res["sites"]) == 30 * 4 and len(res["weights"]) == 30 * 7 and len(res["sensitivity"]["rows"]) == 210
    assert set(res["probes"]["by_category"]["rtn w4a16-g64-asym"]) == {"code", "arithmetic", "factual", "instruction"}
    # SmolLM2's down_proj inputs carry persistent outlier channels (found on every text set)
    assert any(s["outliers"]["persistent"] for s in res["sites"] if s["kind"] == "down")


@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_quantize_attaches_quality_table_and_probes_to_a_report(tmp_path, capsys):
    out = tmp_path / "q.html"
    assert main(["--quiet", "quantize", "smollm2-135m", "--method", "rtn", "--scheme", "w4a16-g64-asym", "--seq-len", "64",
                 "--out", str(tmp_path / "q"), "--report", str(out), "--report-windows", "2"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    float_row, q_row = res["quality"]["rows"]
    assert float_row["kl_divergence"] == 0 and 0 < q_row["kl_divergence"] and q_row["perplexity"] > float_row["perplexity"]
    assert q_row["model_bytes"] < float_row["model_bytes"] / 2
    assert set(res["probes"]["by_category"]["quantized"]) == {"code", "arithmetic", "factual", "instruction"}
    html = out.read_text()
    assert "Quality against the float model" in html and "Task probes" in html


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    out = tmp_path / "r.html"
    assert main(["--quiet", "analyze", "smollm2-135m", "--seq-len", "64", "--sets", "2", "--windows", "1",
                 "--probe-schemes", "w4a16-g64-asym", "--new-tokens", "4", "--sensitivity-windows", "1", "--out", str(out)]) == 0
    script = Path(__file__).parent.parent / "scripts" / "screenshot_report.sh"
    subprocess.run(["bash", str(script), str(out), str(tmp_path / "r.png")], check=True, timeout=120)
    import matplotlib.image as mi

    img = mi.imread(tmp_path / "r.png")
    assert img.shape[0] > 2000 and img.std() > 0.05  # a long page with content, not a blank one
