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
from dataclasses import asdict
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.errors import UserError
from lowbit.io.files import atomic_dir, atomic_path, read_safetensors, save_tensors, write_json
from lowbit.io.lowbit_dir import Payload, write_model_files
from lowbit.models.adapters import decoder_layers
from lowbit.models.disk_names import DiskNames
from lowbit.models.lazy import INDEX, ST_TORCH, LazyCheckpoint, UpcastEmbedding, check_matches, fill, numel, skeleton
from lowbit.models.load import resolve_source
from lowbit.models.moe import is_fused_experts, unfuse_experts
from lowbit.quantization.runner import Blocks, dist_rank_world
from lowbit.runtime.qlinear import install


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
        self.done, self.blocks, self.sizes = 0, {}, {}
        state = self._read()
        if state is not None and state.get("fingerprint") == fingerprint and self._complete(state):
            self.done, self.blocks, self.sizes = state["done"], state["blocks"], state["sizes"]
        elif self.rank == 0 and self.dir.exists():
            if state is not None and state.get("fingerprint") == fingerprint:
                print(f"{self.dir}: a finished block's files are missing or damaged; starting over", flush=True)
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
        """Every file the state relies on is there with the size it was written with."""
        done, sizes = state.get("done", 0), state.get("sizes")
        if not isinstance(sizes, dict):
            return False
        need = [self.shard_name(i) for i in range(done)]
        if state.get("calibrated") and done:
            need += [self.hidden_name(done, r) for r in range(self.world)]
        return all(_size(self.dir / f) == sizes.get(f) for f in need)

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def hidden_name(self, after: int, rank: int) -> str:
        return f"hidden-{after:05d}-rank{rank}.safetensors"

    def hidden(self) -> list[torch.Tensor] | None:
        if self.done == 0:
            return None
        tensors, _ = read_safetensors(self.dir / self.hidden_name(self.done, self.rank))
        return [tensors[f"h{b}"] for b in range(len(tensors))]

    def commit(self, i: int, tensors: dict, metadata: dict, summary: dict, hidden: list[torch.Tensor] | None) -> None:
        if hidden is not None:
            save_tensors({f"h{b}": h.contiguous() for b, h in enumerate(hidden)}, self.dir / self.hidden_name(i + 1, self.rank))
        _sync()
        if self.rank == 0:
            save_tensors(tensors, self.dir / self.shard_name(i), metadata)
            self.blocks[str(i)] = summary
            self.done = i + 1
            written = [self.shard_name(i)] + ([self.hidden_name(i + 1, r) for r in range(self.world)] if hidden is not None else [])
            self.sizes = {k: v for k, v in self.sizes.items() if not k.startswith("hidden-")}
            self.sizes.update({f: _size(self.dir / f) for f in written})
            write_json(self.dir / "progress.json", {"fingerprint": self.fingerprint, "done": self.done,
                                                    "calibrated": hidden is not None, "blocks": self.blocks,
                                                    "sizes": self.sizes})
            for r in range(self.world):  # the previous generation is no longer needed
                (self.dir / self.hidden_name(i, r)).unlink(missing_ok=True)
        else:
            self.done = i + 1
        _sync()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def fingerprint(ckpt: LazyCheckpoint, job) -> str:
    """What decides the output bytes: the input files, the recipe, the calibration, the process
    and thread counts."""
    files = sorted({str(f) for f in ckpt.where.values()})
    cal = job.calibration
    job_desc = {"files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
                "recipe": job.recipe.to_dict(), "gptq": asdict(job.gptq), "float_dtype": str(job.float_dtype),
                "method": {k: v for k, v in asdict(job.method).items() if k != "qat"},
                "calib": [cal.text, cal.text_field, cal.samples, cal.seq_len, cal.seed, cal.batch_size] if job.calibrated else None,
                "world": dist_rank_world()[1], "lowbit": __version__,
                # GEMM summation order follows the thread count, and GPTQ/AWQ decisions follow the sums
                "threads": torch.get_num_threads() if job.calibrated else None}
    return hashlib.sha256(json.dumps(job_desc, sort_keys=True, default=str).encode()).hexdigest()


class CheckpointSource:
    """A safetensors checkpoint streamed block by block: the model is a skeleton on the meta
    device, each block is filled from the shards when the runner reaches it, written to
    the work folder once quantized, and dropped."""

    def __init__(self, source: str, job):
        from transformers import AutoTokenizer

        self.job, self.name = job, source
        _, self.path = resolve_source(source)
        self.ckpt = LazyCheckpoint(self.path)
        self.model = skeleton(self.path, torch.float32, job.trust_remote_code)
        if any(is_fused_experts(m) for m in self.model.modules()):  # per-expert Linears, each read from its own tensor
            self.ckpt.rename(DiskNames(self.model).to_memory)
            unfuse_experts(self.model, copy_weights=False)
        check_matches(self.model, self.ckpt)
        self.prefix, layers = decoder_layers(self.model)
        self.n_blocks = len(layers)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                           trust_remote_code=job.trust_remote_code)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{self.path}: cannot load its tokenizer ({type(e).__name__})") from None

    def blocks(self, bq, calib, out: Path, dry_run: bool) -> "ShardBlocks | None":
        """The work folder's blocks after the pre-flight check (None after a dry run)."""
        model, ckpt = self.model, self.ckpt
        if calib is not None:  # calibration starts at the embedding: its table, kept in its stored dtype
            key = f"{_module_name(model, model.get_input_embeddings())}.weight"
            model.set_input_embeddings(UpcastEmbedding(ckpt.load([key])[key], torch.float32))
        inside = {n: s for n, s in bq.targets.items() if n.startswith(f"{self.prefix}.")}
        self.prediction = _preflight(ckpt, model, self.prefix, self.n_blocks, inside, bq, self.job, calib, out)
        if dry_run:
            return None
        self.groups = outside_groups(ckpt, self.prefix)
        ckpt.check_finite([k for g in self.groups for k in g])  # blocks are checked as they load; these only at the end
        progress = Progress(out, fingerprint(ckpt, self.job), self.n_blocks, self.n_blocks + len(self.groups))
        self.shards = ShardBlocks(self, progress, calib is not None)
        self.facts = {"resumed_from_block": self.shards.start, "preflight": self.prediction.to_dict()}
        return self.shards

    def finish(self, layers: dict, bq, out: Path, describe):
        """The shards outside the blocks, the index, config, tokenizer and lowbit.json; the
        output folder appears in one rename. Returns (None, None): the model is on disk."""
        if dist_rank_world()[0] == 0:
            _write_output(self, self.shards.progress, bq, out, describe)
        _sync()
        return None, None


class ShardBlocks(Blocks):
    """Blocks filled from the checkpoint; each finished one is installed, written as its own
    shard with the hidden states the next block starts from, and dropped."""

    def __init__(self, src: CheckpointSource, progress: "Progress", calibrated: bool):
        self.src, self.progress = src, progress
        self.start = progress.done
        self.hidden = progress.hidden() if calibrated else None
        self.keys = {i: [k for k in src.ckpt.keys() if k.startswith(f"{src.prefix}.{i}.")] for i in range(src.n_blocks)}

    def load(self, i: int, block: torch.nn.Module) -> None:
        # the previous block is gone by now (the runner dropped its own names for it after `done`)
        release_freed_memory()
        model = self.src.model
        if isinstance(model.get_input_embeddings(), UpcastEmbedding):  # calibration has entered block 0
            model.set_input_embeddings(torch.nn.Module())
        fill(block, self.src.ckpt.load(self.keys[i], torch.float32), f"{self.src.prefix}.{i}.")

    def done(self, i: int, block: torch.nn.Module, layers: dict, inputs) -> None:
        prefix = f"{self.src.prefix}.{i}."
        install(self.src.model, {n: layers.pop(n) for n in list(layers) if n.startswith(prefix)})
        payload = Payload.of(block, self.src.job.float_dtype, prefix)
        self.progress.commit(i, payload.tensors, payload.file_metadata(), payload.counts(),
                             inputs.hidden() if inputs is not None else None)
        decoder_layers(self.src.model)[1][i] = torch.nn.Module()  # drop the block: its bytes are on disk now


def _write_output(src: CheckpointSource, progress: "Progress", bq, out: Path, describe) -> None:
    from safetensors import safe_open

    model, ckpt, float_dtype = src.model, src.ckpt, src.job.float_dtype
    n = progress.n_blocks
    total = Payload()
    for i in range(n):
        total.merge(Payload.from_counts(progress.blocks[str(i)]))
    weight_map = {}
    emb_key = f"{_module_name(model, model.get_input_embeddings())}.weight"
    head = _head_name(model)
    # a tied head the recipe quantizes becomes its own tensor, made from the embedding table
    head_from_table = (head in bq.targets and getattr(model.config, "tie_word_embeddings", False)
                       and f"{head}.weight" not in ckpt.where)
    with atomic_dir(out) as tmp:
        for i in range(n):
            shard = progress.dir / progress.shard_name(i)
            try:
                os.link(shard, tmp / shard.name)  # same filesystem: no copy, and the work folder stays whole until the end
            except OSError:
                shutil.copyfile(shard, tmp / shard.name)
            with safe_open(str(tmp / shard.name), framework="pt") as h:
                weight_map.update({k: shard.name for k in h.keys()})
        for j, keys in enumerate(src.groups):
            name = progress.shard_name(n + j)
            if not any(k.removesuffix(".weight") in bq.targets or (k == emb_key and head_from_table) for k in keys):
                total.float_bytes += copy_float_shard(ckpt, keys, float_dtype, tmp / name)  # embedding, head: a slice at a time
                weight_map.update({k: name for k in keys})
                continue
            part = Payload()
            for k, t in ckpt.load(keys).items():
                module = k.removesuffix(".weight")
                if k.endswith(".weight") and module in bq.targets:  # a Linear outside the blocks: round to nearest
                    part.add_layer(module, bq(module, t.to(torch.float32), None))
                    continue
                if k == emb_key and head_from_table:
                    part.add_layer(head, bq(head, t.to(torch.float32), None))
                    model.config.tie_word_embeddings = False
                part.add_float(k, t, float_dtype)
            save_tensors(part.tensors, tmp / name, part.file_metadata())
            weight_map.update({k: name for k in part.tensors})
            total.merge(part)
            del part
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total.quantized_bytes + total.float_bytes},
                                             "weight_map": weight_map}, indent=1, sort_keys=True) + "\n")
        write_model_files(tmp, model.config, src.tokenizer, total.modules, float_dtype, describe(total))
    shutil.rmtree(progress.dir, ignore_errors=True)


def _head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _module_name(model, head) if head is not None else None


def _preflight(ckpt, model, prefix, n_blocks, inside, bq, job, calib, out):
    from lowbit.models.adapters import attention_heads
    from lowbit.quantization.preflight import Job, Machine, check_fits, env_skip, predict

    cfg = model.config
    heads = attention_heads(cfg)[0]
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    quantizer = "gptq" if bq.plan.quantizer == "gptq" and calib is not None else "rtn"
    world = dist_rank_world()[1]
    batch_size = job.calibration.batch_size

    def job_for(samples):
        tokens = (samples * calib.shape[1] // world) if calib is not None else 0
        return Job(ckpt, prefix, n_blocks, dict(inside), cfg.hidden_size, inter, heads, tokens,
                   calib.shape[1] if calib is not None else 0, batch_size, quantizer, bq.hessian,
                   torch.finfo(job.float_dtype).bits // 8)

    widths = {ckpt.shapes[f"{n}.weight"][1]: f"{n}.weight" for n in reversed(list(inside)) if f"{n}.weight" in ckpt.shapes}
    if not widths:
        raise UserError("the recipe quantizes no Linear inside the decoder blocks")
    machine = Machine.measure(ckpt, job.recipe.scheme, quantizer, widths)
    release_freed_memory()  # the measurements' freed tensors are not part of the run's footprint
    n = int(calib.shape[0]) if calib is not None else 0
    pred = predict(job_for(n), machine, out)
    if dist_rank_world()[0] == 0:
        for line in pred.lines():
            print(line, flush=True)
    if not env_skip():
        check_fits(pred, n or None, lambda k: predict(job_for(k), machine, out))
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
                    t = t.to(dtype)  # checked finite before the blocks ran (CheckpointSource.blocks)
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def outside_groups(ckpt: LazyCheckpoint, prefix: str, big: int = 64 << 20) -> list[list[str]]:
    """Tensors outside the blocks, grouped into shards: a large one (embedding, head) alone,
    so only one of them is in memory at a time; the small ones (final norm) together."""
    outside = [k for k in ckpt.keys() if not k.startswith(f"{prefix}.")]
    large = [[k] for k in outside if ckpt.nbytes([k]) >= big]
    small = [k for k in outside if ckpt.nbytes([k]) < big]
    return large + ([small] if small else [])
