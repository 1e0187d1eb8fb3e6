"""`lowbit analyze`: why a scheme works or breaks on this model, in numbers and plots.

analyze() returns one JSON-able dict (every figure in the report); findings.py turns
it into plain words and a recommendation, report.py into a self-contained HTML page.
"""
from __future__ import annotations

import copy
import math
import sys
import time

import torch

from lowbit.analysis.collect import KIND_LABEL, ActivationCollector, linear_kind
from lowbit.analysis.outliers import OUTLIER_RATIO, PERSISTENT_FRACTION, persistence
from lowbit.analysis.probes import load_probes, run_probes
from lowbit.analysis.sensitivity import WEIGHT_SCHEMES, block_index, block_linears, layer_sensitivity, weight_errors
from lowbit.analysis.stats import weight_stats
from lowbit.analysis.studies import clipping_curve, error_vs_bits, metadata_overhead, sym_vs_affine
from lowbit.api import load, make_recipe, quantize
from lowbit.errors import UserError
from lowbit.io.text import load_text, split_text, tokenize
from lowbit.models.adapters import decoder_layers, linear_weight
from lowbit.models.moe import unfuse_experts
from lowbit.runtime.qlinear import dequantized


def text_sets(tokenizer, text: str, n_sets: int, windows: int, seq_len: int) -> dict[str, list[torch.Tensor]]:
    """n_sets disjoint stretches of the text (different documents), `windows` windows each."""
    chunk = len(text) // n_sets
    out = {}
    for i in range(n_sets):
        ids = tokenize(tokenizer, text[i * chunk:(i + 1) * chunk])
        n = min(windows, ids.numel() // seq_len)
        if n < 1:
            raise UserError(f"text set {i + 1}/{n_sets} has {ids.numel()} tokens, fewer than --seq-len {seq_len}; "
                            "give more text or a shorter --seq-len")
        out[f"text {i + 1}"] = [ids[: n * seq_len].reshape(n, seq_len)]
    return out


def _site_row(site, tokenizer, keep_channels: bool) -> dict:
    chan = site.chan
    absmax = chan.absmax
    med = float(absmax.median())
    kurt = torch.nan_to_num(chan.kurtosis, nan=0.0)
    pers = persistence(site.per_set_absmax)
    row = {
        "site": site.label, "block": site.block, "kind": site.kind, "linears": site.linears, "channels": site.channels,
        "tokens": chan.n, "absmax": float(absmax.max()), "median_channel_absmax": med,
        "max_over_median": float(absmax.max()) / med if med > 0 else math.inf,
        "mean_abs_channel_mean": float(chan.mean.abs().mean()), "median_channel_std": float(chan.std.median()),
        "kurtosis_median": float(kurt.median()), "kurtosis_max": float(kurt.max()),
        "outliers": {"channels": sorted(set(pers["persistent"]) | set(pers["transient"])),
                     "persistent": pers["persistent"], "transient": pers["transient"],
                     "per_set": pers["per_set"], "jaccard": pers["jaccard"],
                     "absmax": {c: float(absmax[c]) for c in pers["persistent"] + pers["transient"]}},
        "token": site.tokens.summary(),
        "top_tokens": [{"absmax": v, "token": tokenizer.decode([t]), "position": p} for v, t, p in site.top.items[:8]],
        "act_rel_mse": {k: e / max(q, 1e-30) for k, (e, q) in site.act_err.items()},
    }
    if keep_channels:
        row["channel_absmax"] = absmax.tolist()
    return row


def expert_rows(rows: list[dict]) -> list[dict]:
    """One row per routed expert: the tokens its router sent it (its share of the block's
    routed tokens; uniform routing gives each 1/E) and what its gate/up and down_proj inputs
    look like (the largest channel over the median one, outlier channels)."""
    out: dict[str, dict] = {}
    for r in rows:
        expert = r["linears"][0].rsplit(".", 1)[0]
        row = out.setdefault(expert, {"expert": expert, "block": r["block"], "index": int(expert.rsplit(".", 1)[1])})
        kind = "down" if r["kind"] == "down" else "gate_up"
        if kind == "gate_up":
            row["tokens"] = r["tokens"]
        row[f"{kind}_absmax"] = r["absmax"]
        row[f"{kind}_max_over_median"] = r["max_over_median"]
        row[f"{kind}_outlier_channels"] = len(r["outliers"]["channels"])
    by_block: dict[int, list[dict]] = {}
    for row in out.values():
        by_block.setdefault(row["block"], []).append(row)
    for rs in by_block.values():
        total = sum(r.get("tokens", 0) for r in rs)  # every token counted once per expert it reaches (top-k)
        for r in rs:
            r["share"] = r.get("tokens", 0) / total if total else 0.0
    return sorted(out.values(), key=lambda r: (r["block"], r["index"]))


def representative_blocks(n: int) -> tuple[int, ...]:
    return tuple(sorted({0, n // 2, n - 1}))


@torch.no_grad()
def analyze(source: str, *, text: str = "wiki", text_field: str = "text", seq_len: int = 256, sets: int = 4,
            windows: int = 4, probe_file: str | None = None, probe_schemes=("w4a16-g64-asym", "w3a16-g64-asym"),
            new_tokens: int = 24, sensitivity_scheme: str = "w3a16-g64-asym", sensitivity_windows: int = 2,
            sensitivity_seq_len: int = 128, progress: bool = True) -> dict:
    """Everything the report shows, as one dict."""
    t0 = time.time()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    if sets < 2:
        raise UserError("persistence needs at least 2 text sets (--sets)")
    recipes = [make_recipe(s, "rtn") for s in probe_schemes]  # bad names fail before any work
    probes = load_probes(probe_file)
    model, tok = load(source)
    model.eval()
    if any(True for _ in model.modules() if type(_).__name__ == "QuantLinear"):
        raise UserError(f"{source} is already quantized; analyze its float original (probes compare against it)")
    unfuse_experts(model)  # one Linear per expert projection: each expert's inputs are a site of their own
    _, layers = decoder_layers(model)
    blocks = representative_blocks(len(layers))
    analysis_text, heldout = split_text(load_text(text, text_field))
    tsets = text_sets(tok, analysis_text, sets, windows, seq_len)
    tsets["prompts"] = [tok(p, return_tensors="pt").input_ids for ps in probes.values() for p in ps]

    log(f"analyze: {sum(b.numel() for v in tsets.values() for b in v)} tokens in {len(tsets)} text sets ...")
    timings, t = {}, time.time()
    col = ActivationCollector(model, sample_blocks=blocks)
    try:
        col.run(tsets, progress=progress)
    finally:
        col.close()
    rows = [_site_row(s, tok, s.block in blocks) for s in col.sites.values()]
    sites = [r for r in rows if ".experts." not in r["linears"][0]]
    experts = expert_rows([r for r in rows if ".experts." in r["linears"][0]])
    timings["activations"], t = time.time() - t, time.time()

    log("analyze: weights ...")
    linears = block_linears(model)
    block_of = block_index(model)
    werr = weight_errors(model)
    wstats = {n: weight_stats(linear_weight(m)) for n, m in linears.items()}

    log("analyze: studies on real tensors ...")
    studies = _studies(model, col, blocks, block_of)
    timings["weights_and_studies"], t = time.time() - t, time.time()

    log(f"analyze: per-layer sensitivity ({sensitivity_scheme}, one layer at a time) ...")
    sens_ids = tokenize(tok, heldout)
    sl = sensitivity_seq_len
    n = min(sensitivity_windows, sens_ids.numel() // sl)
    if n < 1:
        raise UserError(f"held-out text has {sens_ids.numel()} tokens, fewer than {sl}")
    sens = layer_sensitivity(model, sens_ids[: n * sl].reshape(n, sl), sensitivity_scheme, progress=progress)
    timings["sensitivity"] = time.time() - t

    t = time.time()
    log(f"analyze: task probes ({', '.join(r.scheme.name for r in recipes)}, RTN) ...")
    variants = {}
    for r in recipes:
        q = quantize(copy.deepcopy(model), recipe=r, tokenizer=tok, progress=False).model
        variants[f"rtn {r.scheme.name}"] = dequantized(q)
    probe_res = run_probes(model, variants, tok, probes, new_tokens)
    timings["probes"] = time.time() - t

    return {
        "model": source, "text": text, "seq_len": seq_len,
        "text_sets": {k: sum(b.numel() for b in v) for k, v in tsets.items()},
        "rules": {"outlier_ratio": OUTLIER_RATIO, "persistent_fraction": PERSISTENT_FRACTION,
                  "outlier_rule": f"input channel absmax >= {OUTLIER_RATIO:g} x the layer's median channel absmax",
                  "persistent_rule": f"an outlier on >= {PERSISTENT_FRACTION:.0%} of the {len(tsets)} text sets"},
        "kind_labels": KIND_LABEL, "representative_blocks": list(blocks), "num_blocks": len(layers),
        "sites": sites,
        "experts": experts,
        "weights": [{"name": n, "kind": linear_kind(n), "block": block_of[n], **wstats[n],
                     "rel_mse": werr[n]} for n in linears],
        "weight_schemes": WEIGHT_SCHEMES,
        "studies": studies,
        "sensitivity": {"scheme": sensitivity_scheme, "windows": n, "seq_len": sl, "rows": sens},
        "probes": probe_res,
        "seconds": time.time() - t0, "timings": timings,
    }


def _studies(model, col: ActivationCollector, blocks, block_of: dict[str, int]) -> dict:
    mid = blocks[len(blocks) // 2]
    lin = block_linears(model)
    weights = [linear_weight(m).detach().float() for n, m in lin.items() if block_of[n] in blocks]
    acts = [col.samples(s) for s in col.sites.values() if s.block in blocks and s.sample]
    down_site = next((s for s in col.sites.values() if s.block == mid and s.kind == "down"), None)
    down_w = next((linear_weight(m).detach().float() for n, m in lin.items() if block_of[n] == mid and linear_kind(n) == "down"), None)
    silu = torch.cat(col.act_fn_samples[mid]) if mid in col.act_fn_samples else None
    out = {
        "weights_error_vs_bits": error_vs_bits(weights, activation=False),
        "activations_error_vs_bits": error_vs_bits(acts, activation=True),
        "blocks": list(blocks),
    }
    if silu is not None:
        out["sym_vs_affine_silu"] = {"tensor": f"block {mid} SiLU(gate) output", **sym_vs_affine(silu)}
    if down_site is not None:
        x = col.samples(down_site)
        out["sym_vs_affine_down_input"] = {"tensor": f"block {mid} down_proj input", **sym_vs_affine(x)}
        out["clipping_activation"] = {"tensor": f"block {mid} down_proj input", **clipping_curve(x, "int8-tensor")}
    if down_w is not None:
        out["clipping_weight"] = {"tensor": f"block {mid} down_proj weight", **clipping_curve(down_w, "int4-channel")}
        out["metadata_overhead"] = {"tensor": f"block {mid} down_proj weight", "rows": metadata_overhead(down_w)}
    return out
