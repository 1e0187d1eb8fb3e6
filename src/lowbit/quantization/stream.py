"""Quantize a checkpoint block by block from disk to disk, resumable after a kill.

Only one decoder block's weights (plus the input embedding while calibrating) are in
memory at a time; each finished block is written as its own shard into a work folder
beside the output (`.<out>.lowbit-work`), together with the hidden states the next
block starts from and a progress file. Progress is committed by an atomic rename after
the block's files are written, so a kill at any instant leaves either the old or the new
state. Rerunning the same command picks up at the first unfinished block and produces
byte-identical output; a different command (other model files, recipe, calibration,
seed, process count) starts over. The output folder appears whole at the end, and the
source checkpoint is only ever read.

Under torch.distributed (torchrun, gloo on CPU or NCCL) every process runs the blocks on
its share of the calibration batches; the statistics are summed across processes
before each block is quantized, and process 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.core.method import Method
from lowbit.errors import UserError
from lowbit.io.files import atomic_dir, atomic_path, save_tensors, write_json
from lowbit.io.lowbit_dir import lowbit_meta, quantized_payload
from lowbit.models.adapters import decoder_layers
from lowbit.models.lazy import INDEX, ST_TORCH, LazyCheckpoint, UpcastEmbedding, check_matches, fill, numel, skeleton
from lowbit.models.load import resolve_source
from lowbit.quantization.job import BlockQuantizer, GPTQOptions, MethodOptions, target_modules
from lowbit.quantization.runner import dist_rank_world, run_sequential
from lowbit.runtime.qlinear import QUANT_BUFFERS, QuantLinear, install

STREAMABLE = "rtn, gptq, awq, smoothquant, outlier-split and their compositions"


@dataclass
class StreamOptions:
    calib: str = "wiki"
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    float_dtype: torch.dtype = torch.float16
    progress: bool = True


def streamable(recipe) -> bool:
    plan = Method.parse(recipe.method)
    return not plan.rotate and plan.quantizer != "qat"


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.lowbit-work"


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Without it the
    tens-of-MB tensors of one block, freed, stay in malloc's arenas in fragments the
    next block cannot always reuse: the peak crept from 1.0 to 1.4 GB over a 22-block
    RTN run, differently from run to run, and the pre-flight could not predict it."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _sync():
    if dist_rank_world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


class Progress:
    """The work folder: one shard per finished block, the hidden states after the last
    one (per process), and progress.json, the commit point."""

    def __init__(self, out: Path, fingerprint: str, n_blocks: int, n_shards: int):
        self.dir = work_dir(out)
        self.fingerprint = fingerprint
        self.n_blocks, self.n_shards = n_blocks, n_shards
        self.rank, self.world = dist_rank_world()
        self.done, self.blocks = 0, {}
        state = self._read()
        if state is not None and state.get("fingerprint") == fingerprint and self._complete(state):
            self.done, self.blocks = state["done"], state["blocks"]
        elif self.rank == 0 and self.dir.exists():
            shutil.rmtree(self.dir)  # another job's leftovers (or a damaged one): start over
        _sync()
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        _sync()

    def _read(self) -> dict | None:
        try:
            return json.loads((self.dir / "progress.json").read_text())
        except (OSError, ValueError):
            return None

    def _complete(self, state: dict) -> bool:
        done = state.get("done", 0)
        shards_ok = all((self.dir / self.shard_name(i)).is_file() for i in range(done))
        hidden_ok = not state.get("calibrated") or done == 0 or all(
            (self.dir / self.hidden_name(done, r)).is_file() for r in range(self.world))
        return shards_ok and hidden_ok

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def hidden_name(self, after: int, rank: int) -> str:
        return f"hidden-{after:05d}-rank{rank}.safetensors"

    def hidden(self) -> list[torch.Tensor] | None:
        from lowbit.io.files import read_safetensors

        if self.done == 0:
            return None
        tensors, _ = read_safetensors(self.dir / self.hidden_name(self.done, self.rank))
        return [tensors[f"h{b}"] for b in range(len(tensors))]

    def commit(self, i: int, tensors: dict, summary: dict, hidden: list[torch.Tensor] | None) -> None:
        if hidden is not None:
            save_tensors({f"h{b}": h.contiguous() for b, h in enumerate(hidden)}, self.dir / self.hidden_name(i + 1, self.rank))
        _sync()
        if self.rank == 0:
            save_tensors(tensors, self.dir / self.shard_name(i), {"format": "lowbit"})
            self.blocks[str(i)] = summary
            self.done = i + 1
            write_json(self.dir / "progress.json", {"fingerprint": self.fingerprint, "done": self.done,
                                                    "calibrated": hidden is not None, "blocks": self.blocks})
            for r in range(self.world):  # the previous generation is no longer needed
                (self.dir / self.hidden_name(i, r)).unlink(missing_ok=True)
        else:
            self.done = i + 1
        _sync()


def fingerprint(ckpt: LazyCheckpoint, recipe, opts: StreamOptions, calibrated: bool) -> str:
    """What decides the output bytes: the input files, the recipe, the calibration, the process
    and thread counts."""
    files = sorted({str(f) for f in ckpt.where.values()})
    job = {"files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
           "recipe": recipe.to_dict(), "gptq": asdict(opts.gptq), "float_dtype": str(opts.float_dtype),
           "method": {k: v for k, v in asdict(opts.method).items() if k != "qat"},
           "calib": [opts.calib, opts.text_field, opts.samples, opts.seq_len, opts.seed, opts.batch_size] if calibrated else None,
           "world": dist_rank_world()[1], "lowbit": __version__,
           # GEMM summation order follows the thread count, and GPTQ/AWQ decisions follow the sums
           "threads": torch.get_num_threads() if calibrated else None}
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def _block_tensors(block: torch.nn.Module, prefix: str, float_dtype: torch.dtype) -> tuple[dict, dict]:
    """(tensors to store, summary) of a finished block: packed codes of its QuantLinears,
    its float parts (norms, biases) in the storage dtype."""
    tensors, modules = quantized_payload(block, prefix)
    qlinears = [m for m in block.modules() if isinstance(m, QuantLinear)]
    qbytes = sum(m.qweight.nbytes for m in qlinears)
    in_cols = sum(m.in_features for m in qlinears)
    kept_cols = sum(int(m.float_cols.numel()) for m in qlinears if m.float_cols is not None)
    fbytes = 0
    skip = {f"{n}.{b}" for n, m in block.named_modules() if isinstance(m, QuantLinear) for b in QUANT_BUFFERS}
    for k, t in block.state_dict().items():
        if k in skip:
            continue
        t = t.to(float_dtype) if t.is_floating_point() else t
        tensors[prefix + k] = t.contiguous()
        fbytes += t.numel() * t.element_size()
    return tensors, {"modules": modules, "quantized_bytes": qbytes, "float_bytes": fbytes,
                     "float_input_channels": kept_cols, "input_channels": in_cols}


def stream_quantize(source: str, recipe, out: str | os.PathLike, opts: StreamOptions | None = None,
                    extra_info: dict | None = None, trust_remote_code: bool = False, dry_run: bool = False) -> dict | None:
    """Quantize `source` (a checkpoint directory or embedded name) into `out`; returns the
    info written to lowbit.json (plus 'seconds', 'resumed_from_block' and 'preflight').
    The pre-flight prediction is printed first; with `dry_run` nothing else happens (None)."""
    from transformers import AutoTokenizer

    from lowbit.io.lowbit_dir import check_output_dir
    from lowbit.io.text import check_text_source, text_windows
    from lowbit.models.adapters import attention_heads

    opts = opts or StreamOptions()
    t0 = time.time()
    plan = Method.parse(recipe.method)
    if not streamable(recipe):
        raise UserError(f"{plan.name} needs the whole model in memory; streaming runs {STREAMABLE}")
    kind, path = resolve_source(source)
    if kind not in ("hf", "embedded"):
        raise UserError(f"{source}: streaming reads safetensors checkpoint directories; this is a {kind} source")
    calibrated = plan.needs_calibration(recipe.scheme)
    if calibrated:
        check_text_source(opts.calib)
    out = check_output_dir(out)
    ckpt = LazyCheckpoint(path)
    model = skeleton(path, torch.float32, trust_remote_code)
    check_matches(model, ckpt)
    prefix, layers = decoder_layers(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: cannot load its tokenizer ({type(e).__name__})") from None
    targets = target_modules(model, recipe)
    inside = {n: s for n, s in targets.items() if n.startswith(f"{prefix}.")}
    bq = BlockQuantizer(plan, targets, attention_heads(model) if plan.smooth else None, opts.gptq, opts.method,
                        opts.float_dtype)
    torch.manual_seed(opts.seed)
    calib = None
    if calibrated:
        calib, _ = text_windows(tok, opts.calib, opts.text_field, opts.seq_len, calib_samples=opts.samples, seed=opts.seed)
        rows = model.get_input_embeddings().weight.shape[0]
        if int(calib.max()) >= rows:
            raise UserError(f"{path}: the tokenizer produces token id {int(calib.max())} but the embedding has {rows} rows; "
                            f"tokenizer and checkpoint do not belong together")
        emb_key = f"{_module_name(model, model.get_input_embeddings())}.weight"
        table = ckpt.load([emb_key])[emb_key]  # kept in its stored dtype; rows come out in float32
        model.set_input_embeddings(UpcastEmbedding(table, torch.float32))
    pred = _preflight(ckpt, model, prefix, len(layers), inside, bq, recipe, opts, calib, out)
    if dry_run:
        return None
    groups = outside_groups(ckpt, prefix)
    progress = Progress(out, fingerprint(ckpt, recipe, opts, calibrated), len(layers), len(layers) + len(groups))
    start = progress.done
    act_amax = {} if bq.static_acts else None
    block_keys = {i: [k for k in ckpt.keys() if k.startswith(f"{prefix}.{i}.")] for i in range(len(layers))}

    def load_block(i, block):
        if isinstance(model.get_input_embeddings(), UpcastEmbedding):  # calibration has entered block 0
            model.set_input_embeddings(torch.nn.Module())
        fill(block, ckpt.load(block_keys[i], torch.float32), f"{prefix}.{i}.")

    def block_done(i, block, results, inputs):
        names = [n for n in list(results) if n.startswith(f"{prefix}.{i}.")]
        bq.set_static_scales({n: act_amax.pop(n) for n in names if act_amax is not None and n in act_amax})
        install(model, {n: results.pop(n) for n in names}, {n: bq.extras.pop(n) for n in names if n in bq.extras})
        tensors, summary = _block_tensors(block, f"{prefix}.{i}.", opts.float_dtype)
        progress.commit(i, tensors, summary, inputs.hidden() if inputs is not None else None)
        layers[i] = torch.nn.Module()  # drop the block: its bytes are on disk now
        release_freed_memory()

    run_sequential(model, inside, bq, calib=calib, batch_size=opts.batch_size, progress=opts.progress,
                   desc=f"{plan.name} {recipe.scheme.name}", true_sequential=opts.gptq.true_sequential,
                   prepare=bq.prepare, hessian=bq.hessian, act_amax=act_amax, load_block=load_block,
                   block_done=block_done, start=start, hidden=progress.hidden() if calibrated else None,
                   outside_blocks=False)
    info = {"method": plan.name, **bq.info, "recipe": recipe.to_dict(), "source": source,
            "calib": opts.calib if calibrated else None, "seed": opts.seed,
            "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])} if calibrated else None,
            **(extra_info or {})}
    if dist_rank_world()[0] == 0:
        _finish(model, ckpt, groups, targets, bq, tok, out, progress, info, opts.float_dtype)
    _sync()
    info["seconds"] = time.time() - t0
    info["resumed_from_block"] = start
    info["preflight"] = pred.to_dict()
    return info


def _preflight(ckpt, model, prefix, n_blocks, inside, bq, recipe, opts, calib, out):
    from lowbit.models.adapters import attention_heads
    from lowbit.quantization.preflight import Job, Machine, check_fits, env_skip, predict

    cfg = model.config
    heads = attention_heads(cfg)[0]
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    quantizer = "gptq" if bq.plan.quantizer == "gptq" and calib is not None else "rtn"
    world = dist_rank_world()[1]

    def job(samples):
        tokens = (samples * calib.shape[1] // world) if calib is not None else 0
        return Job(ckpt, prefix, n_blocks, dict(inside), cfg.hidden_size, inter, heads, tokens,
                   calib.shape[1] if calib is not None else 0, opts.batch_size, quantizer, bq.hessian,
                   torch.finfo(opts.float_dtype).bits // 8)

    widths = {ckpt.shapes[f"{n}.weight"][1]: f"{n}.weight" for n in reversed(list(inside)) if f"{n}.weight" in ckpt.shapes}
    if not widths:
        raise UserError("the recipe quantizes no Linear inside the decoder blocks")
    machine = Machine.measure(ckpt, recipe.scheme, quantizer, widths)
    n = int(calib.shape[0]) if calib is not None else 0
    pred = predict(job(n), machine, out)
    if dist_rank_world()[0] == 0:
        for line in pred.lines():
            print(line, flush=True)
    if not env_skip():
        check_fits(pred, n or None, lambda k: predict(job(k), machine, out))
    return pred


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


ST_DTYPES = {dtype: name for name, dtype in ST_TORCH.items()}  # torch dtype -> safetensors header name


def copy_float_shard(ckpt: LazyCheckpoint, keys: list[str], float_dtype: torch.dtype, path: Path,
                     chunk_bytes: int = 64 << 20) -> int:
    """Write `keys` as one safetensors file, floats cast to `float_dtype`, reading and
    writing one slice of rows at a time: a 1 GB embedding table never sits in memory
    (safetensors' save_file would hold it, its cast and a serialised copy at once).
    Returns the data bytes written."""
    plan, offset = [], 0
    for k in keys:
        shape = ckpt.shapes[k]
        src = ckpt.dtypes[k]
        dtype = float_dtype if src in ("F16", "BF16", "F32", "F64") else None
        item = float_dtype.itemsize if dtype is not None else ckpt.nbytes([k]) // max(numel(shape), 1)
        size = numel(shape) * item
        plan.append((k, shape, dtype, size))
        offset += size
    header, pos = {"__metadata__": {"format": "lowbit"}}, 0
    for k, shape, dtype, size in plan:
        header[k] = {"dtype": ST_DTYPES[dtype] if dtype is not None else ckpt.dtypes[k], "shape": list(shape),
                     "data_offsets": [pos, pos + size]}
        pos += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k, shape, dtype, size in plan:
            rows = shape[0] if shape else 1
            step = max(1, chunk_bytes // max(size // max(rows, 1), 1))
            for r0 in range(0, rows, step):
                t = ckpt.read_rows(k, r0, min(r0 + step, rows)) if shape else ckpt.load([k])[k]
                if dtype is not None:
                    if not torch.isfinite(t).all():
                        raise UserError(f"{ckpt.where[k].name}: {k} holds NaN/Inf values; fix the checkpoint before quantizing")
                    t = t.to(dtype)
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def outside_groups(ckpt: LazyCheckpoint, prefix: str, big: int = 64 << 20) -> list[list[str]]:
    """Tensors outside the blocks, grouped into shards: a large one (embedding, head) alone,
    so only one of them is in memory at a time; the small ones (final norm) together."""
    outside = [k for k in ckpt.keys() if not k.startswith(f"{prefix}.")]
    large = [[k] for k in outside if ckpt.nbytes([k]) >= big]
    small = [k for k in outside if ckpt.nbytes([k]) < big]
    return large + ([small] if small else [])


def _finish(model, ckpt, groups, targets, bq, tok, out, progress, info, float_dtype) -> None:
    """The shards outside the blocks, the index, config, tokenizer and lowbit.json; the
    output folder appears in one rename."""
    from safetensors import safe_open

    config = model.config
    n = progress.n_blocks
    blocks = [progress.blocks[str(i)] for i in range(n)]
    modules, weight_map = {}, {}
    qbytes = sum(b["quantized_bytes"] for b in blocks)
    fbytes = sum(b["float_bytes"] for b in blocks)
    for b in blocks:
        modules.update(b["modules"])
    emb_key = f"{_module_name(model, model.get_input_embeddings())}.weight"
    head_from_table = ("lm_head" in targets and getattr(config, "tie_word_embeddings", False)
                       and "lm_head.weight" not in ckpt.where)
    with atomic_dir(out) as tmp:
        for i in range(n):
            src = progress.dir / progress.shard_name(i)
            try:
                os.link(src, tmp / src.name)  # same filesystem: no copy, and the work folder stays whole until the end
            except OSError:
                shutil.copyfile(src, tmp / src.name)
            with safe_open(str(tmp / src.name), framework="pt") as h:
                weight_map.update({k: src.name for k in h.keys()})
        for j, keys in enumerate(groups):
            name = progress.shard_name(n + j)
            if not any(k.removesuffix(".weight") in targets or (k == emb_key and head_from_table) for k in keys):
                fbytes += copy_float_shard(ckpt, keys, float_dtype, tmp / name)  # embedding, head: a slice at a time
                weight_map.update({k: name for k in keys})
                continue
            tensors = {}
            for k, t in ckpt.load(keys).items():
                name = k.removesuffix(".weight")
                if k.endswith(".weight") and name in targets:  # a Linear outside the blocks the recipe quantizes
                    qt = bq(name, t.to(torch.float32), None)
                    tensors.update(qt.tensors(prefix=f"{name}.qweight."))
                    modules[name], qbytes = qt.meta(), qbytes + qt.nbytes
                    continue
                if k == emb_key and head_from_table:  # a tied head the recipe quantizes: its own tensor from now on
                    qt = bq("lm_head", t.to(torch.float32), None)
                    tensors.update(qt.tensors(prefix="lm_head.qweight."))
                    modules["lm_head"], qbytes = qt.meta(), qbytes + qt.nbytes
                    config.tie_word_embeddings = False
                t = t.to(float_dtype) if t.is_floating_point() else t
                tensors[k] = t.contiguous()
                fbytes += t.numel() * t.element_size()
            save_tensors(tensors, tmp / name, {"format": "lowbit"})
            weight_map.update({k: name for k in tensors})
            del tensors
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": qbytes + fbytes}, "weight_map": weight_map},
                                            indent=1, sort_keys=True) + "\n")
        config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        info["bytes"] = {"quantized_bytes": qbytes, "float_bytes": fbytes, "total_bytes": qbytes + fbytes}
        info["quantized_modules"] = len(modules)
        if bq.plan.outlier_split:
            kept = sum(b["float_input_channels"] for b in blocks)
            total = sum(b["input_channels"] for b in blocks)
            info["outlier_split"] = {"threshold": bq.mopts.outlier_threshold, "float_input_channels": kept,
                                     "float_fraction": kept / max(total, 1)}
        (tmp / "lowbit.json").write_text(json.dumps(lowbit_meta(modules, float_dtype, info), indent=1, sort_keys=True) + "\n")
    shutil.rmtree(progress.dir, ignore_errors=True)
