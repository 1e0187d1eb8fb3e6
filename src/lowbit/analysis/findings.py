"""Plain-word findings and a scheme recommendation, each sentence computed from the figures."""
from __future__ import annotations

import statistics
from collections import Counter

# Below this probe exact-match rate a scheme is said to change what the model writes.
PROBE_OK = 0.5


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def outlier_summary(res: dict) -> list[dict]:
    """Per site kind: how many sites have (persistent) outlier channels, the worst ratio, the overlap."""
    rows = []
    for kind in res["kind_labels"]:
        sites = [s for s in res["sites"] if s["kind"] == kind]
        if not sites:
            continue
        worst = max(sites, key=lambda s: s["max_over_median"])
        rows.append({
            "kind": kind, "label": res["kind_labels"][kind], "sites": len(sites),
            "with_outliers": sum(bool(s["outliers"]["channels"]) for s in sites),
            "with_persistent": sum(bool(s["outliers"]["persistent"]) for s in sites),
            "persistent_channels": sum(len(s["outliers"]["persistent"]) for s in sites),
            "max_over_median": worst["max_over_median"], "worst_site": worst["site"],
            "jaccard_median": _med([s["outliers"]["jaccard"] for s in sites]),
            "first_token_ratio_median": _med([s["token"]["first_token_mean_absmax"] / max(s["token"]["other_tokens_mean_absmax"], 1e-30)
                                              for s in sites]),
        })
    return rows


def spike_tokens(res: dict, ratio: float = 6.0) -> list[tuple[str, int]]:
    """Token strings that appear among a site's largest tokens at >= ratio x its median token absmax."""
    c = Counter()
    for s in res["sites"]:
        med = s["token"]["median_absmax"]
        for t in s["top_tokens"]:
            if t["absmax"] >= ratio * med:
                c["<position 0>" if t["position"] == 0 else repr(t["token"])] += 1
    return c.most_common(8)


def findings(res: dict) -> list[str]:
    out = []
    summ = outlier_summary(res)
    kinds = [r for r in sorted(summ, key=lambda r: -r["persistent_channels"]) if r["persistent_channels"]]
    if kinds:
        top = max(kinds, key=lambda r: r["max_over_median"])
        out.append(
            f"Persistent outlier channels ({res['rules']['outlier_rule']}; persistent = {res['rules']['persistent_rule']}): "
            + "; ".join(f"{r['label']}: {r['with_persistent']} of {r['sites']} layers, {r['persistent_channels']} channels, "
                        f"overlap across texts (Jaccard) {r['jaccard_median']:.2f}" for r in kinds)
            + f". The largest sits at {top['worst_site']}, {top['max_over_median']:.0f}x its layer's median channel. "
            "High overlap means the channels belong to the model, not to the text; low overlap means that beside a "
            "persistent core many channels spike on one text only.")
    else:
        out.append(f"No channel is an outlier on {res['rules']['persistent_rule']}: activation outliers here are text-specific.")
    ratio = lambda s: s["token"]["first_token_max_absmax"] / max(s["token"]["other_tokens_mean_absmax"], 1e-30)
    sinks = [s for s in res["sites"] if ratio(s) > 10]
    if sinks:
        w = max(sinks, key=ratio)
        out.append(f"Token-wise outliers: at {len(sinks)} layer inputs the first token of a sequence (the attention sink) "
                   f"reaches more than 10x the mean token magnitude; worst at {w['site']}, "
                   f"{w['token']['first_token_max_absmax']:.0f} against {w['token']['other_tokens_mean_absmax']:.1f} "
                   "for the other tokens. A per-tensor activation scale there is set by that one token.")
    spikes = spike_tokens(res)
    if spikes:
        out.append("Tokens most often among the largest activations (>= 6x the median token): "
                   + ", ".join(f"{t} ({n} layers)" for t, n in spikes[:5]) + ".")
    a8t = _med([s["act_rel_mse"]["int8 per-tensor"] for s in res["sites"]])
    a8k = _med([s["act_rel_mse"]["int8 per-token"] for s in res["sites"]])
    a4k = _med([s["act_rel_mse"]["int4 per-token"] for s in res["sites"]])
    w8 = _med([w["rel_mse"]["int8 per-channel"] for w in res["weights"]])
    w4 = _med([w["rel_mse"]["int4 g128"] for w in res["weights"]])
    worst_a8 = max(res["sites"], key=lambda s: s["act_rel_mse"]["int8 per-tensor"])
    out.append(f"Weights are easy, activations are not: the median relative MSE is {w8:.1e} for INT8 per-channel weights "
               f"and {w4:.1e} for INT4 g128 weights, but {a8t:.1e} for INT8 per-tensor activations "
               f"({a8t / a8k:.1f}x per-token's {a8k:.1e}; worst {worst_a8['site']} at "
               f"{worst_a8['act_rel_mse']['int8 per-tensor']:.1e}) and {a4k:.1e} for INT4 per-token activations, "
               f"{a4k / w4:.0f}x the INT4 weight error.")
    sens = sorted(res["sensitivity"]["rows"], key=lambda r: -r["kl"])
    if sens:
        total = sum(max(r["kl"], 0) for r in sens)
        k = max(1, len(sens) // 10)
        share = sum(max(r["kl"], 0) for r in sens[:k]) / total if total > 0 else float("nan")
        out.append(f"Sensitivity ({res['sensitivity']['scheme']}, one layer at a time): the {k} most sensitive layers "
                   f"({', '.join(r['name'].split('layers.')[-1] for r in sens[:3])}, ...) carry {share:.0%} of the summed KL; "
                   f"the most sensitive alone costs KL {sens[0]['kl']:.3f}, the median layer {_med([r['kl'] for r in sens]):.4f}.")
    ex = res.get("experts") or []
    if ex:
        n = max(r["index"] for r in ex) + 1
        busiest, idlest = max(ex, key=lambda r: r["share"]), min(ex, key=lambda r: r["share"])
        spiky = max(ex, key=lambda r: r.get("down_max_over_median", 0))
        out.append(f"Experts: {len(ex)} routed experts in {len({r['block'] for r in ex})} blocks; uniform routing would give "
                   f"each {1 / n:.1%} of a block's tokens, but {busiest['expert']} gets {busiest['share']:.1%} and "
                   f"{idlest['expert']} {idlest['share']:.1%} ({idlest.get('tokens', 0)} tokens: a GPTQ Hessian from so few "
                   f"is why lowbit calibrates every expert on every token by default). The spikiest expert input is "
                   f"{spiky['expert']}'s down_proj, {spiky.get('down_max_over_median', 0):.0f}x its median channel.")
    st = res["studies"]
    g = {(r["bits"], r["granularity"]): r["rel_mse"] for r in st["weights_error_vs_bits"]}
    if (4, "tensor") in g and (4, "g64") in g:
        out.append(f"Granularity on this model's weights at INT4: per-tensor {g[(4, 'tensor')]:.1e}, per-channel "
                   f"{g[(4, 'channel')]:.1e}, g128 {g.get((4, 'g128'), float('nan')):.1e}, g64 {g[(4, 'g64')]:.1e}, "
                   f"g32 {g.get((4, 'g32'), float('nan')):.1e} relative MSE.")
    if "sym_vs_affine_silu" in st:
        s = st["sym_vs_affine_silu"]
        r4 = next(r for r in s["rows"] if r["bits"] == 4)
        out.append(f"{s['tensor']} lies in [{s['min']:.2f}, {s['max']:.1f}]: affine INT4 per-token has "
                   f"{r4['affine_gain']:.1f}x less error than symmetric ({r4['affine']:.1e} vs {r4['symmetric']:.1e}), "
                   "because a symmetric grid spends half its codes on negatives that never exceed 0.28.")
    for key in ("clipping_weight", "clipping_activation"):
        if key in st:
            c = st[key]
            out.append(f"Clipping, {c['tensor']} at {c['scheme']}: the best common clip is {c['best_clip']:.2f} of the "
                       f"range ({c['best_rel_mse']:.1e} vs {c['absmax_rel_mse']:.1e} at absmax); searching each group's "
                       f"own clip gives {c['per_group_search_rel_mse']:.1e}.")
    if "metadata_overhead" in st:
        m = {(r["granularity"], r["affine"]): r["overhead_bits"] for r in st["metadata_overhead"]["rows"]}
        sizes = [g for g in ("g128", "g64", "g32") if (g, False) in m]  # a narrow model has no g128 row
        if ("g32", True) in m and sizes:
            out.append("Metadata: fp16 scales cost " + ", ".join(f"{m[(g, False)]:.3f} extra bits per weight at {g}" for g in sizes)
                       + f"; affine zero points add {m[('g32', True)] - m[('g32', False)]:.3f} more at g32.")
    for name, cats in res["probes"]["by_category"].items():
        worst = min(cats.items(), key=lambda kv: (kv[1]["exact_match"], kv[1]["first_divergence"]))
        best = max(cats.items(), key=lambda kv: (kv[1]["exact_match"], kv[1]["first_divergence"]))
        out.append(f"Probes, {name}: {worst[0]} breaks first (exact match {worst[1]['exact_match']:.0%}, first "
                   f"divergence at token {worst[1]['first_divergence']:.1f} on average), {best[0]} holds best "
                   f"({best[1]['exact_match']:.0%}).")
    return out


def recommend(res: dict) -> list[str]:
    rec = []
    probes = res["probes"]["by_category"]

    def exact(name):
        cats = probes.get(name, {})
        return statistics.mean(c["exact_match"] for c in cats.values()) if cats else None

    names = sorted(probes)
    four = next((n for n in names if "w4" in n), None)
    three = next((n for n in names if "w3" in n), None)
    if four is not None:
        e4 = exact(four)
        if e4 >= PROBE_OK:
            rec.append(f"Weight-only 4-bit is the sweet spot: even plain RTN ({four}) reproduces {e4:.0%} of the float "
                       "model's greedy continuations; ship W4A16-g64 affine with GPTQ (lower perplexity than RTN) "
                       "and keep lm_head / embeddings in higher precision.")
        else:
            rec.append(f"4-bit weights change what this model writes: RTN ({four}) reproduces only {e4:.0%} of greedy "
                       "continuations. Use GPTQ with affine groups of 64 (or 32) and check the probes again; "
                       "if the categories you serve still diverge, stay at 8-bit weights (W8A16 loses almost nothing).")
    if three is not None:
        e3 = exact(three)
        rec.append(f"3-bit: {e3:.0%} of continuations survive RTN {three.split()[-1]}; "
                   + ("usable with GPTQ for prose." if e3 >= PROBE_OK else
                      "avoid uniform 3-bit for this model; mixed precision (keep the most sensitive layers at 4-8 bits) "
                      "is the way below 4 bits."))
    a8t = _med([s["act_rel_mse"]["int8 per-tensor"] for s in res["sites"]])
    a8k = _med([s["act_rel_mse"]["int8 per-token"] for s in res["sites"]])
    a4k = _med([s["act_rel_mse"]["int4 per-token"] for s in res["sites"]])
    persistent = sum(len(s["outliers"]["persistent"]) for s in res["sites"])
    rec.append(f"W8A8: use dynamic per-token activation scales (median error {a8k:.1e}); static per-tensor scales "
               f"cost {a8t / max(a8k, 1e-30):.1f}x more"
               + (f" and {persistent} persistent outlier channels would set them: migrate them into the weights "
                  "(SmoothQuant) first." if persistent else "."))
    rec.append(f"W4A4 is not usable as is (INT4 per-token activation error {a4k:.1e}); it needs the outliers rotated "
               "away (Hadamard rotation) before 4-bit activations are worth measuring.")
    sens = sorted(res["sensitivity"]["rows"], key=lambda r: -r["kl"])[:5]
    if sens:
        rec.append("For mixed precision, give extra bits first to: " + ", ".join(r["name"] for r in sens) + ".")
    return rec
