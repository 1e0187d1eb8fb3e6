"""Speed, measured against the memory roof of the machine it runs on.

- roof: a STREAM-like copy (read + write bytes / time) over arrays far larger than
  the last-level cache, with the same thread count as everything else;
- GEMV microbenchmarks: y = x W^T for each path (float dtypes, packed kernels, and
  the naive dequantize-whole-weight-then-multiply path), weights rotated through
  enough copies that none stays in cache; reported as GB/s of stored weight bytes
  and % of the roof;
- end-to-end: decode tokens/s at batch 1 with a static KV cache, prefill tokens/s
  at several prompt lengths, and where decode time goes (Linears vs the rest).
All ratios come from one run on one machine.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.runtime.attention import register as register_attention
from lowbit.runtime.generate import decode_engine, generate

MIN_COLD_BYTES = 256 * 2**20


def cold_bytes() -> int:
    """Data to sweep so that nothing stays cached: 4x this host's last-level cache (sysfs),
    at least 256 MiB (a Xeon's 480 MiB L3 holds a whole small model and a 256 MiB sweep)."""
    from lowbit.evaluate.host import cache_sizes

    return max(MIN_COLD_BYTES, 4 * max(cache_sizes().values(), default=0))


def _best(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median: robust to a stray scheduler hiccup


def copy_bandwidth(nbytes: int | None = None, repeat: int = 7) -> float:
    """STREAM 'copy' bandwidth in GB/s (bytes read + bytes written), over cold_bytes() by default."""
    nbytes = nbytes or cold_bytes()
    a = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    t = _best(lambda: b.copy_(a), repeat)
    return 2 * nbytes / t / 1e9


def read_bandwidth(nbytes: int | None = None, repeat: int = 7) -> float:
    """DRAM read bandwidth in GB/s over cold_bytes() (by default): the roof a weight-streaming
    GEMV, which only reads, can reach."""
    from lowbit.runtime.kernels import native

    nbytes = nbytes or cold_bytes()
    a = torch.ones(nbytes // 16384 * 4096, dtype=torch.float32)
    # two readers, the faster counts: on the Xeon host torch's sum read ~15% slower than an fp32
    # GEMV (MKL) over the same bytes, so percentages of a sum-only roof flattered the kernels;
    # and the same bytes on 2 MiB pages too, where lowbit's kernels keep their weights
    x = torch.ones(4096)

    def seconds(buf: torch.Tensor) -> float:
        rows = buf.view(-1, 4096)
        return min(_best(lambda: buf.sum(), repeat), _best(lambda: torch.mv(rows, x), repeat))

    t = min(seconds(buf) for buf in [a] + ([native.on_huge_pages(a)] if native.available() else []))
    return a.numel() * 4 / t / 1e9


def gemv_variants(n: int, k: int, group_size: int = 128, seed: int = 0) -> dict[str, tuple[Callable, int, Callable]]:
    """name -> (make_state() for one weight copy, stored weight bytes, run(x, state))."""
    from lowbit.core.tensor import quantize_tensor
    from lowbit.runtime.kernels import KERNELS

    g = torch.Generator().manual_seed(seed)

    def w():
        return torch.randn(n, k, generator=g) * 0.02

    out = {}
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        out[tag] = (lambda dt=dt: w().to(dt), n * k * dt.itemsize, lambda x, st, dt=dt: torch.nn.functional.linear(x.to(dt), st))
    kernels = {k_.name: k_ for k_ in KERNELS}
    pairs = [(f"int4-g{group_size}", "lowbit-int4"), (f"int4-g{group_size}", "int4pack"),
             ("int8-channel", "lowbit-int8"), ("int8-channel", "int8pack")]
    for scheme, kname in pairs:
        qt0 = quantize_tensor(w(), scheme)
        if not kernels[kname].supports(qt0, torch.bfloat16, torch.device("cpu")):
            continue  # lowbit's kernels need AVX512-BF16 and a compiler

        def make(scheme=scheme, kname=kname):
            return kernels[kname].prepare(quantize_tensor(w(), scheme), torch.bfloat16)

        out[f"{scheme} {kname} bf16"] = (make, qt0.nbytes, lambda x, st, kname=kname: kernels[kname].run(x.to(torch.bfloat16), st))
    qt0 = quantize_tensor(w(), f"int4-g{group_size}")
    out[f"int4-g{group_size} naive dequant+matmul bf16"] = (
        lambda: quantize_tensor(w(), f"int4-g{group_size}"), qt0.nbytes,
        lambda x, qt: torch.nn.functional.linear(x.to(torch.bfloat16), qt.dequantize(torch.bfloat16)))
    return out


def gemv_bench(shapes: list[tuple[int, int]], roof_gb_s: float, batch: int = 1, group_size: int = 128,
               min_bytes: int | None = None, variants: list[str] | None = None) -> list[dict]:
    """Per (shape, variant): seconds per GEMV over cache-cold weights (rotated through
    cold_bytes() of copies), GB/s, % of roof. `variants`: the names that contain one of
    these, or that equal one given as '=name'."""
    min_bytes = min_bytes or cold_bytes()
    rows = []
    for n, k in shapes:
        for name, (make, nbytes, run) in gemv_variants(n, k, group_size).items():
            if variants and not any(name == v[1:] if v.startswith("=") else v in name for v in variants):
                continue
            copies = 2 if "naive" in name else max(2, -(-min_bytes // nbytes))  # naive: compute-bound anyway
            t = _time_rotating(run, [make() for _ in range(copies)], torch.randn(batch, k))
            rows.append({"shape": [n, k], "variant": name, "batch": batch, "weight_bytes": nbytes,
                         "us_per_call": t * 1e6, "gb_per_s": nbytes / t / 1e9,
                         "percent_of_roof": 100 * nbytes / t / 1e9 / roof_gb_s})
    return rows


def _time_rotating(run: Callable, states: list, x: torch.Tensor) -> float:
    """Seconds per call of run(x, state), cycling through `states` so no weight stays cached."""
    def sweep():
        for st in states:
            run(x, st)

    return _best(sweep, repeat=5, warmup=1) / len(states)


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, repeat: int = 3) -> float:
    """Prompt tokens/s of one forward with the next token's logits only (the last position),
    as a serving engine's prefill and llama-bench's pp test compute them."""
    t = _best(lambda: model(input_ids=input_ids, use_cache=False, logits_to_keep=1), repeat, warmup=1)
    return input_ids.numel() / t


def speed_variants(source: str, schemes: list[str], lm_head: str = "int8", progress: bool = False) -> dict[str, nn.Module]:
    """The float model in fp32/bf16/fp16 and one bf16-activation model per scheme.

    Speed does not depend on how codes were chosen, so schemes are applied with
    RTN. `lm_head`: 'int8' quantizes the output projection per channel (W8, an
    int8 kernel; the input embedding stays a bf16 lookup table), 'float' keeps it
    in bf16. Every variant, float ones included, uses lowbit's attention
    (attention.py): transformers' eager and SDPA paths spend more per decoded
    token on this CPU than a 4-bit model spends in its Linears.
    """
    import copy

    from lowbit.api import load, make_recipe, quantize
    from lowbit.core.scheme import Scheme
    from lowbit.models.load import resolve_source

    kind, _ = resolve_source(source)
    base, _ = load(source)
    models: dict[str, nn.Module] = {}
    if kind == "lowbit":
        models[f"{source} (bf16 activations)"] = base.to(torch.bfloat16)
    else:
        for tag, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            models[tag] = copy.deepcopy(base).to(dt)
        for name in schemes:
            recipe = make_recipe(name, "rtn")
            if lm_head == "int8":
                recipe.overrides["lm_head"] = Scheme.parse("w8a16")
            q = quantize(copy.deepcopy(base), recipe=recipe, progress=progress, float_dtype=torch.bfloat16).model
            models[f"{recipe.scheme.name}" + (" +int8 lm_head" if lm_head == "int8" else "")] = q.to(torch.bfloat16)
    for m in models.values():
        m.set_attn_implementation(register_attention())
        m.eval()
    return models


@contextmanager
def environment(settings: dict[str, str]):
    """os.environ with `settings` applied, restored after."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def round_robin(tasks: dict, rounds: int) -> dict[object, list]:
    """Each task (a callable) once per round, in order, `rounds` times: what each returned, per
    round. A host whose bandwidth drifts over minutes, or a neighbour's burst, then lands on
    every task of a round alike, and a ratio taken round by round (ratio_by_round) cancels it
    where a ratio of two separately timed figures does not."""
    out = {key: [] for key in tasks}
    for _ in range(rounds):
        for key, fn in tasks.items():
            out[key].append(fn())
    return out


def ratio_by_round(a: list[float], b: list[float]) -> dict:
    """a[i] / b[i] for each round i of a round_robin: the median, the extremes and each."""
    import statistics

    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "by_round": r}


def end_to_end(models: dict[str, nn.Module], tokenizer, *, new_tokens: int = 64, prompt_lens=(32, 128),
               prompt: str = "The history of the city begins", rounds: int = 3,
               env: dict[str, dict[str, str]] | None = None,
               peers: dict[str, Callable[[], dict]] | None = None) -> dict[str, dict]:
    """Decode tokens/s (batch 1, static cache) and prefill tokens/s per prompt length.

    Decode is timed through lowbit's decode loop where the architecture allows it (the
    headline figure) and through transformers' forward (always, `*_transformers`).
    Variants are timed round_robin, `rounds` times, and each reports its median and its
    figure per round (`*_rounds`). `env`: per variant, environment settings it runs under
    (LOWBIT_GEMV_ACT=int8: one model timed twice, with its GEMVs on bf16 and on int8
    activations). `peers`: other engines timed in the same rounds (name -> a callable that
    returns `decode_tokens_per_s` and `prefill_tokens_per_s` at the longest prompt, as
    llamacpp.bench does); each gets an entry of those medians and their `*_rounds`.
    """
    import statistics
    from functools import partial

    env = env or {}

    def run(name, fn, *args, **kwargs):
        with environment(env.get(name, {})):
            return fn(*args, **kwargs)

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    prompts = {n: torch.randint(0, next(iter(models.values())).config.vocab_size, (1, n),
                                generator=torch.Generator().manual_seed(n)) for n in prompt_lens}
    engines = {name: sorted({decode_engine(m), "transformers"}) for name, m in models.items()}
    # one pass with Linear timers per engine (also the warm-up); the timed rounds run without hooks
    timed = {(name, e): run(name, generate, m, ids, new_tokens, engine=e, time_linears=True)
             for name, m in models.items() for e in engines[name]}
    tasks = {}
    for name, m in models.items():
        for e in engines[name]:
            tasks[name, e] = partial(run, name, generate, m, ids, new_tokens, engine=e)
        for n, p in prompts.items():
            tasks[name, n] = partial(run, name, prefill_tokens_per_s, m, p, repeat=1)
    tasks.update(peers or {})
    got = round_robin(tasks, rounds)
    linear_fraction = {k: g["decode_linear_seconds"] / g["decode_seconds"] for k, g in timed.items()}
    out = {}
    for name, m in models.items():
        e = decode_engine(m)
        decode = {eng: [g["decode_tokens_per_s"] for g in got[name, eng]] for eng in engines[name]}
        by_len = {str(n): statistics.median(got[name, n]) for n in prompt_lens}
        tps = statistics.median(decode[e])
        out[name] = {
            "decode_tokens_per_s": tps,
            "decode_tokens_per_s_rounds": decode[e],
            "decode_ms_per_token": 1e3 / tps,
            "decode_engine": e,
            "decode_native_step": got[name, e][-1]["native_step"],  # the layer stack in C++ (decode_step.cpp)
            "decode_linear_fraction": linear_fraction[name, e],
            "decode_tokens_per_s_transformers": statistics.median(decode["transformers"]),
            "decode_linear_fraction_transformers": linear_fraction[name, "transformers"],
            "prefill_tokens_per_s": by_len[str(max(prompt_lens))],  # at the longest prompt
            "prefill_tokens_per_s_rounds": got[name, max(prompt_lens)],
            "prefill_tokens_per_s_by_len": by_len,
            "text": tokenizer.decode(got[name, e][-1]["tokens"][0][:24]),
        }
    for name in peers or {}:
        out[name] = {}
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            per_round = [r[key] for r in got[name]]
            out[name][key], out[name][f"{key}_rounds"] = statistics.median(per_round), per_round
    return out


def format_speed(res: dict) -> str:
    v = res["variants"]
    base = v.get("fp32", next(iter(v.values())))["decode_tokens_per_s"]
    lens = list(next(iter(v.values()))["prefill_tokens_per_s_by_len"])
    base_tf = v.get("fp32", next(iter(v.values())))["decode_tokens_per_s_transformers"]
    lines = [f"DRAM roofs ({res['threads']} threads): read {res['read_roof_gb_per_s']:.1f} GB/s, copy "
             f"{res['roof_gb_per_s']:.1f} GB/s (GEMV % of the read roof: it only reads)", "",
             f"{'variant':28s} {'engine':>12s} {'decode tok/s':>12s} {'vs fp32':>8s} {'linears':>8s} "
             f"{'transformers':>12s} {'vs fp32':>8s} " + " ".join(f"{'prefill ' + n:>13s}" for n in lens)]
    for name, r in v.items():
        tf = r["decode_tokens_per_s_transformers"]
        engine = r["decode_engine"] + (" (C++)" if r.get("decode_native_step") else "")
        lines.append(f"{name:28s} {engine:>12s} {r['decode_tokens_per_s']:12.1f} {r['decode_tokens_per_s'] / base:7.2f}x "
                     f"{100 * r['decode_linear_fraction']:7.0f}% {tf:12.1f} {tf / base_tf:7.2f}x "
                     + " ".join(f"{r['prefill_tokens_per_s_by_len'][n]:13.0f}" for n in lens))
    if "gemv" in res:
        lines += ["", f"{'GEMV (batch 1)':44s} {'us':>9s} {'GB/s':>7s} {'% read':>7s}"]
        for g in res["gemv"]:
            lines.append(f"{g['variant'] + ' ' + 'x'.join(map(str, g['shape'])):44s} {g['us_per_call']:9.1f} "
                         f"{g['gb_per_s']:7.1f} {g['percent_of_roof']:6.0f}%")
    return "\n".join(lines)
