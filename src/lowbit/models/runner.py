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

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import decoder_layers, linear_modules, linear_weight, set_linear_weight


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
        _, layers = decoder_layers(model)
        calls = []

        def hook(_mod, args, kwargs):
            calls.append((args, kwargs))
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return cls(calls)

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


class HessianCollector:
    """Accumulates H = X^T X / n over each watched Linear's inputs."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            if name not in self.H:
                self.H[name] = torch.zeros(x.shape[1], x.shape[1])
                self.n[name] = 0
            self.H[name].addmm_(x.t(), x)
            self.n[name] += x.shape[0]

        return hook

    def pop(self, name: str) -> torch.Tensor | None:
        """H for `name`, or None if calibration never reached it (the caller rounds to nearest)."""
        if name not in self.H:
            return None
        return self.H.pop(name) / max(self.n.pop(name), 1)

    def close(self):
        for h in self.handles:
            h.remove()


def run_sequential(model: nn.Module, targets: dict[str, object], quantize_fn, *, calib: torch.Tensor | None,
                   batch_size: int = 8, progress: bool = True, desc: str = "quantize",
                   true_sequential: bool = False) -> dict[str, object]:
    """Quantize the Linears named in `targets` block by block.

    quantize_fn(name, weight [out,in], hessian or None) -> QuantizedTensor. With
    calib=None (RTN) no calibration runs and no Hessian is collected. Each block's
    weights are replaced by their dequantized values before its outputs are
    recomputed, so the next block sees what inference will see. With
    `true_sequential`, the same holds inside a block: each stage's statistics (say
    o_proj's) are collected after the stages before it (q/k/v) were quantized.
    Returns {module name: QuantizedTensor}.
    """
    prefix, layers = decoder_layers(model)
    results = {}
    inputs = BlockInputs.capture(model, calib, batch_size) if calib is not None else None
    bar = tqdm(range(len(layers)), desc=desc, unit="block", disable=not progress, leave=False)
    t0 = time.time()
    for i in bar:
        block = layers[i]
        names = {f"{prefix}.{i}.{n}": m for n, m in linear_modules(block).items() if f"{prefix}.{i}.{n}" in targets}
        if names and inputs is None:
            for name, mod in names.items():
                qt = quantize_fn(name, linear_weight(mod), None)
                set_linear_weight(mod, qt.dequantize())
                results[name] = qt
        elif names:
            stages = sequential_stages(block, names, inputs) if true_sequential else [list(names)]
            for stage in stages:
                collector = HessianCollector({n: names[n] for n in stage})
                # stages come in call order, so nothing after a stage's last Linear is needed
                inputs.feed(block, stop_after=names[stage[-1]] if true_sequential else None)
                collector.close()
                for name in stage:
                    mod = names[name]
                    qt = quantize_fn(name, linear_weight(mod), collector.pop(name))
                    set_linear_weight(mod, qt.dequantize())
                    results[name] = qt
        if inputs is not None:
            inputs = inputs.run(block)
        bar.set_postfix_str(f"{time.time() - t0:.0f}s")
    # Linears outside the blocks (only if a recipe asks for them, e.g. lm_head): round to nearest.
    for name in targets:
        if name not in results:
            mod = model.get_submodule(name)
            qt = quantize_fn(name, linear_weight(mod), None)
            set_linear_weight(mod, qt.dequantize())
            results[name] = qt
    return results
