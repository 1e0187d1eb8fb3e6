"""One self-contained HTML page (plots embedded as PNG data URIs) and the JSON beside it."""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from lowbit.analysis.findings import findings, outlier_summary, recommend
from lowbit.io.files import atomic_path

_KIND_COLORS = {"qkv": "tab:blue", "o": "tab:orange", "gate_up": "tab:green", "down": "tab:red", "other": "tab:gray"}

_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%}li{margin:.3em 0}.small{color:#666;font-size:.9em}pre{white-space:pre-wrap;background:#f8f8f8;padding:.5em}"""


def _fig_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return html.escape(str(v))


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _outlier_plot(res: dict) -> str:
    plt = _plt()
    cand = [s for s in res["sites"] if "channel_absmax" in s]
    site = max(cand, key=lambda s: s["max_over_median"])
    a = site["channel_absmax"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(len(a)), a, width=1.0, color="0.6")
    for c in site["outliers"]["persistent"]:
        ax.bar(c, a[c], width=3, color="tab:red")
    for c in site["outliers"]["transient"]:
        ax.bar(c, a[c], width=3, color="tab:orange")
    ax.axhline(res["rules"]["outlier_ratio"] * site["median_channel_absmax"], ls="--", color="k", lw=0.8,
               label=f"{res['rules']['outlier_ratio']:g} x median")
    ax.set_yscale("log")
    ax.set(xlabel="input channel", ylabel="absmax over all text",
           title=f"{site['site']} ({res['kind_labels'][site['kind']]}): red = persistent, orange = transient")
    ax.legend()
    return _fig_uri(fig)


def _ratio_heatmap(res: dict) -> str:
    plt = _plt()
    kinds = [k for k in res["kind_labels"] if any(s["kind"] == k for s in res["sites"])]
    nb = res["num_blocks"]
    grid = [[math.nan] * nb for _ in kinds]
    for s in res["sites"]:
        grid[kinds.index(s["kind"])][s["block"]] = math.log10(max(s["max_over_median"], 1e-3))
    fig, ax = plt.subplots(figsize=(10, 2.4))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set(xlabel="block", title="log10(max channel absmax / median channel absmax) per layer input")
    fig.colorbar(im, ax=ax)
    return _fig_uri(fig)


def _error_by_block(res: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    nb = res["num_blocks"]

    def per_block(items, get):
        vals = [[] for _ in range(nb)]
        for it in items:
            vals[it["block"]].append(get(it))
        return [sum(v) / len(v) if v else math.nan for v in vals]

    for label, style in (("int8 per-tensor", "-"), ("int8 per-token", "--"), ("int4 per-token", ":")):
        ax.plot(per_block(res["sites"], lambda s: s["act_rel_mse"][label]), style, color="tab:red", label=f"activations {label}")
    for label, style in (("int8 per-channel", "--"), ("int4 g128", ":")):
        ax.plot(per_block(res["weights"], lambda w: w["rel_mse"][label]), style, color="tab:blue", label=f"weights {label}")
    ax.set_yscale("log")
    ax.set(xlabel="block", ylabel="relative MSE (mean over the block's tensors)",
           title="Weights vs activations: quantization error per block")
    ax.legend(fontsize=8, ncol=2)
    return _fig_uri(fig)


def _sensitivity_plot(res: dict) -> str:
    plt = _plt()
    rows = res["sensitivity"]["rows"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(len(rows)), [max(r["kl"], 1e-6) for r in rows], width=1.0,
           color=[_KIND_COLORS.get(r["kind"], "tab:gray") for r in rows])
    ax.set_yscale("log")
    ax.set(xlabel="Linear layer (model order)", ylabel="KL vs float",
           title=f"Sensitivity: only this layer quantized ({res['sensitivity']['scheme']}); "
                 "blue q/k/v, orange o, green gate/up, red down")
    return _fig_uri(fig)


def _bits_plot(res: dict) -> str:
    plt = _plt()
    st = res["studies"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "weights_error_vs_bits", "weights"), (axes[1], "activations_error_vs_bits", "activations")):
        rows = st[key]
        for gran in dict.fromkeys(r["granularity"] for r in rows):
            pts = [(r["bits"], r["rel_mse"]) for r in rows if r["granularity"] == gran]
            ax.plot(*zip(*pts), marker="o", label=gran)
        ax.set_yscale("log")
        ax.set(xlabel="bits", title=f"{title} (blocks {', '.join(map(str, st['blocks']))})")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("relative MSE")
    return _fig_uri(fig)


def _clip_plot(res: dict) -> str:
    plt = _plt()
    st = res["studies"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for key in ("clipping_weight", "clipping_activation"):
        if key in st:
            c = st[key]
            ax.plot(c["clip"], c["rel_mse"], label=f"{c['tensor']} ({c['scheme']})")
            ax.plot([c["best_clip"]], [c["best_rel_mse"]], "k*", ms=10)
    ax.set_yscale("log")
    ax.set(xlabel="clip factor (fraction of absmax range)", ylabel="relative MSE", title="Clipping threshold: MSE curve, optimum starred")
    ax.legend(fontsize=8)
    return _fig_uri(fig)


def quality_section(quality: dict) -> str:
    cols = [("method", "method"), ("scheme", "scheme"), ("perplexity", "perplexity"), ("kl_divergence", "KL"),
            ("top1_agreement", "top-1"), ("model_bytes", "bytes"), ("seconds", "quantize s")]
    ev = quality.get("evaluation", {})
    return (f"<h2>Quality against the float model</h2><p class=small>Held-out text, {ev.get('windows')} windows x "
            f"{ev.get('seq_len')} tokens.</p>" + table(quality["rows"], cols))


def probes_section(probes: dict) -> str:
    rows = [{"model": m, "category": c, **v} for m, cats in probes["by_category"].items() for c, v in cats.items()]
    out = ("<h2>Task probes</h2><p>Greedy continuations of "
           f"{probes['new_tokens']} tokens, quantized vs float, per prompt category.</p>"
           + table(rows, [("model", "model"), ("category", "category"), ("prompts", "prompts"), ("exact_match", "exact match"),
                          ("edit_distance", "edit distance / length"), ("first_divergence", "first divergent token (mean)")]))
    ex = []
    for r in probes["prompts"]:
        for m, v in r["models"].items():
            if not v["exact_match"] and len(ex) < 6:
                ex.append(f"<li><b>{html.escape(r['category'])}</b>, {html.escape(m)}, diverges at token {v['first_divergence']}"
                          f"<pre>{html.escape(r['prompt'])}\n  float: {html.escape(r['reference'])}\n  quant: "
                          f"{html.escape(v['text'])}</pre></li>")
    return out + ("<p>Examples of divergence:</p><ul>" + "".join(ex) + "</ul>" if ex else "")


def _head(title: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")


_FOOT = "<p class=small>Every figure on this page is in the JSON file beside it.</p></body></html>"


def render_quantize(res: dict) -> str:
    """The report `lowbit quantize --report` writes: its quality table and task probes."""
    q = res["quality"]
    parts = [_head(f"lowbit quantize: {res['model']}"),
             f"<p class=small>{html.escape(res['method'])} {html.escape(res['scheme'])}; quantized in {res['seconds']:.0f} s.</p>",
             quality_section(q), probes_section(res["probes"]), _FOOT]
    return "\n".join(parts)


def render(res: dict) -> str:
    """The analysis report as HTML."""
    if res.get("kind") == "quantize":
        return render_quantize(res)
    parts = [_head(f"lowbit analysis: {res['model']}"),
             f"<p class=small>{sum(res['text_sets'].values())} tokens in {len(res['text_sets'])} text sets "
             f"({html.escape(', '.join(res['text_sets']))}) from '{html.escape(res['text'])}'; windows of {res['seq_len']} "
             f"tokens; {res['seconds']:.0f} s. Outlier rule: {html.escape(res['rules']['outlier_rule'])}; persistent: "
             f"{html.escape(res['rules']['persistent_rule'])}.</p>",
             "<h2>What we found</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in findings(res)) + "</ul>",
             "<h2>Recommendation for this model</h2><ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in recommend(res)) + "</ul>"]
    parts += [
        "<h2>Outlier channels</h2>",
        table(outlier_summary(res), [("label", "layer input"), ("sites", "layers"), ("with_outliers", "with outliers"),
                                     ("with_persistent", "with persistent"), ("persistent_channels", "persistent channels"),
                                     ("max_over_median", "worst max/median"), ("worst_site", "worst at"),
                                     ("jaccard_median", "overlap across texts (Jaccard)"),
                                     ("first_token_ratio_median", "first token / others (median layer)")]),
        _img(_outlier_plot(res), "channel absmax"), _img(_ratio_heatmap(res), "outlier ratio heatmap"),
        "<h2>Token-wise outliers</h2>",
        table([{"site": s["site"], "first": s["token"]["first_token_mean_absmax"], "other": s["token"]["other_tokens_mean_absmax"],
                "max": s["token"]["max_absmax"], "top": ", ".join(f"{t['token']!r}@{t['position']}" for t in s["top_tokens"][:4])}
               for s in sorted(res["sites"], key=lambda s: -s["token"]["max_absmax"])[:10]],
              [("site", "layer input"), ("first", "first-token mean absmax"), ("other", "other tokens"),
               ("max", "max token absmax"), ("top", "largest tokens (token@position)")]),
        *_experts_section(res),
        "<h2>Weights vs activations</h2>", _img(_error_by_block(res), "error by block"),
        "<h2>Per-layer sensitivity</h2>", _img(_sensitivity_plot(res), "sensitivity"),
        table(sorted(res["sensitivity"]["rows"], key=lambda r: -r["kl"])[:10],
              [("name", "layer"), ("kind", "kind"), ("kl", "KL vs float"), ("delta_nll", "delta NLL")]),
        "<h2>Studies on this model's tensors</h2>", _img(_bits_plot(res), "error vs bits"), _img(_clip_plot(res), "clipping"),
    ]
    st = res["studies"]
    for key in ("sym_vs_affine_silu", "sym_vs_affine_down_input"):
        if key in st:
            s = st[key]
            parts.append(f"<p>Symmetric vs affine, {html.escape(s['tensor'])} (range [{s['min']:.3g}, {s['max']:.3g}], "
                         f"{s['fraction_negative']:.0%} negative), per token:</p>"
                         + table(s["rows"], [("bits", "bits"), ("symmetric", "symmetric"), ("affine", "affine"), ("affine_gain", "gain")]))
    if "metadata_overhead" in st:
        parts.append(f"<p>Stored bits per weight, INT4, {html.escape(st['metadata_overhead']['tensor'])} (fp16 scales):</p>"
                     + table(st["metadata_overhead"]["rows"], [("granularity", "granularity"), ("affine", "affine"),
                                                               ("bits_per_weight", "bits/weight"), ("overhead_bits", "overhead"),
                                                               ("rel_mse", "relative MSE")]))
    parts.append(probes_section(res["probes"]))
    parts.append(_FOOT)
    return "\n".join(parts)


def _experts_section(res: dict) -> list[str]:
    """Mixture-of-experts models: token load per expert (a heatmap over blocks) and the experts
    whose inputs carry the largest outliers."""
    ex = res.get("experts") or []
    if not ex:
        return []
    plt = _plt()
    blocks = sorted({r["block"] for r in ex})
    n = max(r["index"] for r in ex) + 1
    grid = [[0.0] * n for _ in blocks]
    for r in ex:
        grid[blocks.index(r["block"])][r["index"]] = r["share"]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.25 * n), 1 + 0.3 * len(blocks)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_title(f"share of each block's routed tokens (uniform: {1 / n:.1%})")
    fig.colorbar(im, ax=ax)
    cols = [("expert", "expert"), ("tokens", "tokens routed"), ("share", "share"), ("gate_up_max_over_median", "gate/up input max/median"),
            ("gate_up_outlier_channels", "outlier channels"), ("down_max_over_median", "down input max/median"),
            ("down_outlier_channels", "outlier channels")]
    return ["<h2>Experts</h2>", _img(_fig_uri(fig), "expert load"),
            "<p>The least-loaded experts (the fewest calibration tokens) and the spikiest expert inputs:</p>",
            table(sorted(ex, key=lambda r: r["share"])[:5] + sorted(ex, key=lambda r: -r.get("down_max_over_median", 0))[:5], cols)]


def write_report(res: dict, out: str | Path) -> tuple[Path, Path]:
    """Write OUT (HTML) and OUT with .json (every figure); both appear atomically."""
    out = Path(out)
    js = out.with_suffix(".json")
    html_text = render(res)
    with atomic_path(js) as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(html_text, encoding="utf-8")
    return out, js
