"""Checkpoints read lazily: an empty model skeleton, and tensors loaded one block at a time.

A model far larger than RAM is quantized by building it on the meta device (shapes only,
no storage) and filling one decoder block at a time from the safetensors shards.
Every header is read and checked up front, so a truncated shard or a config that
disagrees with the tensors fails before any work, with the file and tensor named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import UserError

INDEX = "model.safetensors.index.json"


class LazyCheckpoint:
    """Tensor names, shapes and dtypes of a safetensors checkpoint (one file or sharded with
    an index); tensors are read only when asked for."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        files, listed = self._files()
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        if listed is not None and listed.get(k) != f.name:
                            continue  # the index is authoritative: a shard may hold tensors it does not list
                        sl = h.get_slice(k)
                        self.where[k], self.shapes[k], self.dtypes[k] = f, tuple(sl.get_shape()), sl.get_dtype()
            except Exception as e:  # safetensors raises several types for truncated or corrupt headers
                raise UserError(f"{f}: unreadable safetensors file, truncated or corrupt ({type(e).__name__}: {e})") from None
        self._offsets: dict[Path, tuple[int, dict]] = {}
        self.disk_key: dict[str, str] = {}  # in-memory name -> the name in the file, where they differ
        if listed is not None and len(self.where) < len(listed):
            k = next(k for k in listed if k not in self.where)
            raise UserError(f"{self.path / INDEX}: {k} is not in {listed[k]}, where the index says it is")
        if not self.where:
            raise UserError(f"{self.path}: the safetensors files hold no tensors")

    def _files(self) -> tuple[list[Path], dict | None]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not a {tensor: file} object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
            return files, weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no .safetensors weights (lowbit reads safetensors and GGUF only, never pickles)")
        return files, None

    def rename(self, to_memory: dict[str, str]) -> None:
        """Know each tensor by its in-memory name (`to_memory`: {checkpoint key: model key},
        models/disk_names.py); the files are read under their own names."""
        name = {k: to_memory.get(k, k) for k in self.where}
        self.where, self.shapes, self.dtypes = ({name[k]: v for k, v in d.items()} for d in (self.where, self.shapes, self.dtypes))
        self.disk_key = {m: k for k, m in name.items() if m != k}

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a tensor read with plain file reads: unlike the memory map behind
        safe_open, nothing read this way stays resident in this process."""
        f = self.where[name]
        if f not in self._offsets:
            with open(f, "rb") as h:
                n = int.from_bytes(h.read(8), "little")
                self._offsets[f] = (8 + n, json.loads(h.read(n)))
        base, header = self._offsets[f]
        shape, dtype = self.shapes[name], _torch_dtype(self.dtypes[name], name)
        row = dtype.itemsize * numel(shape[1:])
        if not shape:  # a scalar: one "row" of one element
            shape, row = (1,), dtype.itemsize
        start = base + header[self.disk_key.get(name, name)]["data_offsets"][0] + r0 * row
        fd = os.open(f, os.O_RDONLY)
        try:
            data = os.pread(fd, (r1 - r0) * row, start)
        finally:
            os.close(fd)
        if len(data) != (r1 - r0) * row:
            raise UserError(f"{f}: {name} is cut short (truncated file)")
        if not data:
            return torch.empty(r1 - r0, *shape[1:], dtype=dtype)
        t = torch.frombuffer(bytearray(data), dtype=dtype)
        return t.reshape(r1 - r0, *shape[1:]) if self.shapes[name] else t.reshape(())

    def check_finite(self, names, chunk_bytes: int = 64 << 20) -> None:
        """Every floating tensor named is free of NaN/Inf, read a slice of rows at a time."""
        for k in names:
            shape = self.shapes[k]
            if not _torch_dtype(self.dtypes[k], k).is_floating_point:
                continue
            rows = shape[0] if shape else 1
            step = max(1, chunk_bytes // max(self.nbytes([k]) // max(rows, 1), 1))
            for r0 in range(0, rows, step):
                _check_finite(self.read_rows(k, r0, min(r0 + step, rows)), k, self.where[k])

    def keys(self) -> list[str]:
        return list(self.where)

    def nbytes(self, names=None) -> int:
        return sum(numel(self.shapes[k]) * _torch_dtype(self.dtypes[k], k).itemsize
                   for k in (names if names is not None else self.where))

    def load(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to `dtype`), each checked for NaN/Inf."""
        out = {}
        for k in names:
            t = self.read_rows(k, 0, self.shapes[k][0] if self.shapes[k] else 1)
            if t.is_floating_point():
                _check_finite(t, k, self.where[k])
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
            out[k] = t
        return out


ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _torch_dtype(st: str, name: str) -> torch.dtype:
    if st not in ST_TORCH:
        raise UserError(f"{name}: safetensors dtype {st} is not one lowbit reads ({', '.join(ST_TORCH)})")
    return ST_TORCH[st]


def numel(shape) -> int:
    """Elements of a tensor of this shape (from a header, before any storage exists)."""
    n = 1
    for d in shape:
        n *= d
    return n


def _check_finite(t: torch.Tensor, name: str, f: Path) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        n = int(bad.sum())
        raise UserError(f"{f.name}: {name} holds {n} NaN/Inf value(s) of {t.numel()}; fix the checkpoint before quantizing")


def skeleton(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (no storage) and real buffers
    (rotary frequencies), from the checkpoint's config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # a hand-edited or foreign config.json fails inside transformers in many ways
        raise UserError(f"{path}: unsupported or unreadable config.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return model.eval()


def check_matches(model: nn.Module, ckpt: LazyCheckpoint) -> None:
    """The checkpoint holds exactly the tensors the config implies, with the same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    wrong = [(k, ckpt.shapes[k], expected[k]) for k in ckpt.keys() if k in expected and ckpt.shapes[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        raise UserError(f"{ckpt.path}: config.json disagrees with the tensors: {k} is {list(got)} in the checkpoint, "
                        f"the config implies {list(want)} ({len(wrong)} such tensor(s))")
    missing = [k for k in expected if k not in ckpt.where and not (tied and k.startswith("lm_head."))]
    if missing:
        raise UserError(f"{ckpt.path}: the checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. {missing[0]}")
    unexpected = [k for k in ckpt.keys() if k not in expected]
    if unexpected:
        raise UserError(f"{ckpt.path}: the checkpoint holds {len(unexpected)} tensor(s) the config does not, e.g. {unexpected[0]}")


def fill(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Give a meta `module` the real tensors stored under `prefix`."""
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(sd, strict=True, assign=True)


class UpcastEmbedding(nn.Module):
    """An embedding table kept in its stored dtype (bf16: half the memory) whose rows come
    out in the compute dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).to(self.dtype)
