"""The sequential runner: quantize a model block by block with bounded memory.

1. Run the calibration windows through the model until the first decoder block and
   keep that block's inputs (hidden states plus the keyword arguments the model
   passes every block: position embeddings, masks).
2. For each block: run it over the inputs with hooks that collect what the
   algorithm needs from each Linear's input (the Hessian X^T X for GPTQ); quantize
   its Linears; run the block again *with the quantized weights* and use those
   outputs as the next block's inputs, so errors propagate as at inference.

Only one block's inputs, outputs and statistics are alive at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.transforms import apply_input_transform
from lowbit.errors import UserError
from lowbit.models.adapters import decoder_layers, linear_modules, linear_weight, set_linear_weight


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when it is not in use."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StopForward(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockInputs:
    """The inputs of the current block, batch by batch (args, kwargs as the model called it)."""

    def __init__(self, calls: list[tuple[tuple, dict]]):
        self.calls = calls

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, windows: torch.Tensor, batch_size: int) -> "BlockInputs":
        """Batches of `batch_size` windows; under torch.distributed each process takes
        every world-th batch, so the batches themselves match a one-process run."""
        _, layers = decoder_layers(model)
        rank, world = dist_rank_world()
        batches = list(windows.split(batch_size))
        if len(batches) < world:
            raise UserError(f"{len(batches)} calibration batches cannot be split over {world} processes; "
                            f"use more --samples or fewer processes")
        calls = []

        def hook(_mod, args, kwargs):
            calls.append((args, kwargs))
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in batches[rank::world]:
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return cls(calls)

    def hidden(self) -> list[torch.Tensor]:
        """The hidden states of every batch (what a resume checkpoint must keep)."""
        return [args[0] if args else kwargs["hidden_states"] for args, kwargs in self.calls]

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        if len(hidden) != len(self.calls):
            raise ValueError(f"{len(hidden)} hidden-state batches for {len(self.calls)} calls")
        return BlockInputs([((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
                            for h, (args, kwargs) in zip(hidden, self.calls)])

    @torch.no_grad()
    def run(self, block: nn.Module) -> "BlockInputs":
        """Run `block` over every batch; its outputs become the next block's inputs."""
        nxt = []
        for args, kwargs in self.calls:
            out = _first(block(*args, **kwargs))
            if args:
                nxt.append(((out, *args[1:]), kwargs))
            else:
                nxt.append((args, {**kwargs, "hidden_states": out}))
        return BlockInputs(nxt)

    @torch.no_grad()
    def feed(self, block: nn.Module, stop_after: nn.Module | None = None) -> None:
        """Run `block` for its hooks only, dropping the outputs (and stopping once
        `stop_after` has run, when nothing later in the block is needed)."""
        handle = None
        if stop_after is not None:
            def stop(*_):
                raise _StopForward
            handle = stop_after.register_forward_hook(stop)
        try:
            for args, kwargs in self.calls:
                try:
                    block(*args, **kwargs)
                except _StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()


def sequential_stages(block: nn.Module, modules: dict[str, nn.Module], inputs: "BlockInputs") -> list[list[str]]:
    """Split a block's Linears into the stages inference runs them in.

    Linears that read the same input tensor (q/k/v; gate/up) form one stage; stages are
    ordered by first call (attention in, attention out, MLP in, MLP out for a Llama
    block). Found by watching one batch, so it holds for any architecture.
    """
    seen: list[tuple[torch.Tensor, str]] = []  # holding the inputs keeps their identity unique

    def hook(name):
        def h(_mod, inp, _out):
            if all(n != name for _, n in seen):
                seen.append((inp[0], name))
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        BlockInputs(inputs.calls[:1]).feed(block)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for key, name in seen:
        if stages and key is last:
            stages[-1].append(name)
        else:
            stages.append([name])
        last = key
    missing = [n for n in modules if all(n not in st for st in stages)]
    return stages + ([missing] if missing else [])


def linear_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input a Linear's weight actually multiplies, as float32 rows (after its online
    Hadamard, if it has one: the stored weight is rotated to match)."""
    x = apply_input_transform(x, getattr(mod, "input_transform", None))
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float32)


class InputStats:
    """What calibration learns about one Linear's inputs: H = X^T X / n (when collected),
    per-channel absmax, mean |x| and sum x^2 (what SmoothQuant, AWQ, outlier splitting and
    an imatrix need).

    Each batch's X^T X is computed in float32 and summed in float64, so the sum does not
    depend on the order the batches arrive in: processes that split the calibration
    batches (reduce()) reach what one process reaches, to float64 rounding."""

    def __init__(self, cols: int, hessian: bool):
        self.H = torch.zeros(cols, cols, dtype=torch.float64) if hessian else None
        self.amax = torch.zeros(cols)
        self.abssum = torch.zeros(cols, dtype=torch.float64)
        self.sqsum = torch.zeros(cols, dtype=torch.float64)  # diag(X^T X): llama.cpp's imatrix
        self.n = 0
        self.routed = 0  # of the n rows, those a mixture-of-experts router sent (n unless every token was shown)

    def add(self, x: torch.Tensor, routed: int | None = None) -> None:
        if self.H is not None:
            self.H += (x.t() @ x).double()
        a = x.abs()
        self.amax = torch.maximum(self.amax, a.amax(0))
        self.abssum += a.sum(0, dtype=torch.float64)
        self.sqsum += (a * a).sum(0, dtype=torch.float64)
        self.n += x.shape[0]
        self.routed += x.shape[0] if routed is None else routed

    def reduce(self) -> None:
        """Combine with the same statistics of the other torch.distributed processes."""
        import torch.distributed as dist

        n = torch.tensor([self.n, self.routed], dtype=torch.float64)
        for t in (self.H, self.abssum, self.sqsum, n):
            if t is not None:
                dist.all_reduce(t)
        dist.all_reduce(self.amax, op=dist.ReduceOp.MAX)
        self.n, self.routed = (int(v) for v in n.tolist())

    def finish(self) -> "InputStats":
        if self.H is not None and self.H.dtype == torch.float64:
            self.H = (self.H / max(self.n, 1)).to(torch.float32)
        return self

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.n, 1)).float()

    def rescale(self, s: torch.Tensor) -> None:
        """The statistics of x / s (after a smoothing scale s was folded into the weights)."""
        s = s.to(torch.float32)
        if self.H is not None:
            self.H /= s[:, None] * s[None, :]
        self.amax /= s
        self.abssum /= s.double()
        self.sqsum /= s.double() ** 2


class StatsCollector:
    """Hooks that accumulate InputStats over each watched Linear's inputs."""

    def __init__(self, modules: dict[str, nn.Module], hessian: bool = True):
        self.stats: dict[str, InputStats] = {}
        self.hessian = hessian
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(mod, inputs, _out):
            x = linear_input(mod, inputs[0])
            if name not in self.stats:
                self.stats[name] = InputStats(x.shape[1], self.hessian)
            self.stats[name].add(x, getattr(mod, "routed_rows", None))  # set by RoutedExperts showing every token

        return hook

    def pop(self, name: str) -> InputStats | None:
        """Stats for `name`, or None if calibration never reached it (the caller rounds to nearest)."""
        st = self.stats.pop(name, None)
        if st is not None and dist_rank_world()[1] > 1:
            st.reduce()
        return st.finish() if st is not None else None

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass
class RunOptions:
    batch_size: int = 8
    progress: bool = True
    desc: str = "quantize"
    true_sequential: bool = False  # each stage of a block sees the stages before it quantized


class Blocks:
    """Where the runner's blocks come from and where finished ones go. This default is a
    model held whole in memory; streaming (quantization.stream) loads each block off disk,
    writes it when done and resumes after a kill."""

    start = 0  # blocks before this one are done (resume)
    hidden = None  # their outputs: the inputs of block `start`

    def load(self, i: int, block: nn.Module) -> None:
        pass

    def done(self, i: int, block: nn.Module, layers: dict, inputs: "BlockInputs | None") -> None:
        pass


def run_sequential(model: nn.Module, quantizer, calib: torch.Tensor | None, opts: RunOptions,
                   blocks: Blocks | None = None) -> dict[str, object]:
    """Quantize the Linears inside the decoder blocks that `quantizer.targets` names, block by block.

    quantizer(name, weight [out,in], InputStats or None, input_transform) -> QuantizedLayer.
    With calib=None (RTN) no calibration runs and no statistics are collected. Each block's
    weights are replaced by the layers' effective weights before its outputs are
    recomputed, so the next block sees what inference will see. With
    `opts.true_sequential`, the same holds inside a block: each stage's statistics (say
    o_proj's) are collected after the stages before it (q/k/v) were quantized.

    `quantizer.prepare(block, names, stats)`, if set, runs once per block after its
    statistics are collected and before anything is quantized: SmoothQuant and AWQ fold
    their scales into the block there (and rescale `stats` to match). With
    `quantizer.static_acts`, each quantized Linear's per-channel input absmax is measured
    *after* quantization (what a static activation scale must cover at inference) and
    handed to `quantizer.set_static_scales`.

    Returns {module name: QuantizedLayer} for the layers `blocks.done` did not take.
    """
    blocks = blocks or Blocks()
    prefix, layers = decoder_layers(model)
    results = {}
    inputs = BlockInputs.capture(model, calib, opts.batch_size) if calib is not None else None
    if inputs is not None and blocks.hidden is not None:
        inputs = inputs.with_hidden(blocks.hidden)
    bar = tqdm(range(blocks.start, len(layers)), desc=opts.desc, unit="block", disable=not opts.progress, leave=False)
    t0 = time.time()
    for i in bar:
        block = layers[i]
        blocks.load(i, block)
        names = {f"{prefix}.{i}.{n}": m for n, m in linear_modules(block).items() if f"{prefix}.{i}.{n}" in quantizer.targets}
        stages = [list(names)] if names else []
        if inputs is not None and opts.true_sequential and quantizer.prepare is None and names:
            stages = sequential_stages(block, names, inputs)
        for stage in stages:
            stats = dict.fromkeys(stage)
            if inputs is not None:
                collector = StatsCollector({n: names[n] for n in stage}, hessian=quantizer.hessian)
                # stages come in call order, so nothing after a stage's last Linear is needed
                inputs.feed(block, stop_after=names[stage[-1]] if len(stages) > 1 else None)
                collector.close()
                stats = {name: collector.pop(name) for name in stage}
                if quantizer.prepare is not None:
                    quantizer.prepare(block, {n: names[n] for n in stage}, stats)
            for name in stage:
                mod = names[name]
                layer = quantizer(name, linear_weight(mod), stats.pop(name), getattr(mod, "input_transform", None))
                set_linear_weight(mod, layer.effective_weight())
                results[name] = layer
        if inputs is not None:
            after = StatsCollector(names, hessian=False) if quantizer.static_acts and names else None
            inputs = inputs.run(block)
            if after is not None:
                after.close()
                quantizer.set_static_scales(results, {n: st.amax for n in names if (st := after.pop(n)) is not None})
        blocks.done(i, block, results, inputs)
        # let go of this block before the next one is loaded: streaming drops it in
        # blocks.done, and the loop's own names would otherwise keep two blocks alive
        block = names = mod = None
        bar.set_postfix_str(f"{time.time() - t0:.0f}s")
    return results
