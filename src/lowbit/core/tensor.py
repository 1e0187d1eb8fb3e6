"""QuantizedTensor: packed integer codes, scales, zero points and the Scheme."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from lowbit.core.qparams import as_2d, choose_qparams, dequantize_grouped, encode_grouped, group_view, num_groups, ungroup
from lowbit.core.scheme import Scheme, SchemeError
from lowbit.errors import UserError

# ---- bit packing ------------------------------------------------------------
# Codes are packed densely, little-endian: code i occupies bits [i*b, (i+1)*b) of the
# stream. Eight codes of b bits are exactly b bytes, so we pack in chunks of eight
# (two 4-bit codes per byte, 3-bit codes at 8 per 3 bytes, ...) and drop the unused
# tail bytes of the last chunk: the stream is exactly ceil(numel * bits / 8) bytes.

def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


# Packing goes through int64 words (8 bytes per code): a slice of this many codes at a
# time keeps that temporary at 8 MB.
PACK_CHUNK = 1 << 20


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) of any shape -> flat uint8 stream of packed_nbytes bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes (1..8 bits)")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    for a in range(0, n, PACK_CHUNK):  # PACK_CHUNK is a multiple of 8: a slice fills whole bytes
        b = min(a + PACK_CHUNK, n)
        c = torch.nn.functional.pad(flat[a:b].to(torch.int64), (0, (-(b - a)) % 8)).reshape(-1, 8)
        words = (c << (torch.arange(8, dtype=torch.int64) * bits)).sum(-1)  # 8*bits <= 56 bits: no carries
        stream = ((words.unsqueeze(-1) >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF).to(torch.uint8)
        start = a * bits // 8
        out[start:start + packed_nbytes(b - a, bits)] = stream.reshape(-1)[:packed_nbytes(b - a, bits)]
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 stream -> flat uint8 codes (numel of them)."""
    if bits == 8:
        return packed[:numel]
    if bits in (1, 2, 4):  # codes never straddle a byte: shift within uint8
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    wide = torch.int32 if bits <= 3 else torch.int64  # 8 codes = 8*bits bits per word
    out = torch.empty(numel, dtype=torch.uint8)
    for a in range(0, numel, PACK_CHUNK):  # bits bytes hold 8 codes: slices start on a word
        n = min(PACK_CHUNK, numel - a)
        b = packed[a * bits // 8:(a + n) * bits // 8 + bits].to(wide)
        b = torch.nn.functional.pad(b, (0, (-b.numel()) % bits)).reshape(-1, bits)
        words = (b << (torch.arange(bits, dtype=wide) * 8)).sum(-1, dtype=wide)
        codes = (words.unsqueeze(-1) >> (torch.arange(8, dtype=wide) * bits)) & ((1 << bits) - 1)
        out[a:a + n] = codes.reshape(-1)[:n]
    return out


def scale_nbytes(scheme: Scheme, rows: int, groups: int, cols: int) -> int:
    """Bytes of the scales and zero points of [rows, groups] parameters over rows of `cols`."""
    if scheme.super_block:  # integers of scale_bits per group (twice with a zero), one fp16 (two) per super-block
        k = 2 if scheme.float_zero else 1
        return (rows * groups * scheme.scale_bits * k + 7) // 8 + rows * math.ceil(cols / scheme.super_block) * 2 * k
    n = rows * groups * scheme.scale_storage_dtype.itemsize
    if scheme.float_zero:
        return 2 * n
    return n + (packed_nbytes(rows * groups, scheme.bits) if scheme.has_zero_point else 0)


# ---- the tensor ---------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """A tensor stored on a low-bit grid.

    codes:       flat uint8, `bits`-wide codes packed densely (row-major over `shape`)
    scale:       [scale_rows, groups] in the scheme's scale dtype (uint8 biased exponents for E8M0)
    zero_point:  affine integer schemes only: packed like codes ([scale_rows, groups]
                 integers), or for a float zero domain [scale_rows, groups] in the scale dtype
    Dequantization: w_hat = scale * (decode(code) - zero_point), or with a float zero
    domain w_hat = scale * code + zero_point (GGUF Q4_1).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    shape: tuple[int, ...]
    scheme: Scheme

    # ---- sizes ----------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def scale_shape(self) -> tuple[int, int]:
        rows = math.prod(self.shape[:-1])
        return num_groups(self.scheme, rows, self.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes + scales + packed zero points."""
        n = self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += self.zero_point.numel() * self.zero_point.element_size()
        return n

    @property
    def format_nbytes(self) -> int:
        """Bytes in the scheme's own format: `nbytes`, except for two-level (K-quant) scales,
        which lowbit keeps as exact fp32 products and GGUF as `scale_bits` integers per
        group plus one fp16 factor per super-block."""
        if not self.scheme.super_block:
            return self.nbytes
        return packed_nbytes(self.numel, self.scheme.bits) + scale_nbytes(self.scheme, *self.scale_shape, self.shape[-1])

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # ---- values ---------------------------------------------------------
    def unpacked_codes(self) -> torch.Tensor:
        """uint8 codes in the original shape."""
        return unpack_codes(self.codes, self.scheme.bits, self.numel).reshape(self.shape)

    def zero_points(self) -> torch.Tensor | None:
        """Zero points (integers, or float offsets) as float32 [scale_rows, groups], or None."""
        if self.zero_point is None:
            return None
        if self.scheme.float_zero:
            return self.zero_point.to(torch.float32)
        r, g = self.scale_shape
        return unpack_codes(self.zero_point, self.scheme.bits, r * g).reshape(r, g).to(torch.float32)

    def scales(self) -> torch.Tensor:
        """Scales as float32 [scale_rows, groups]."""
        if self.scheme.scale_dtype == "e8m0":
            return torch.exp2(self.scale.to(torch.float32) - 127)
        return self.scale.to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.scheme
        rows, cols = math.prod(self.shape[:-1]), self.shape[-1]
        codes = as_2d(self.unpacked_codes())
        scale, z = self.scales(), self.zero_points()
        out = torch.empty(rows, cols, dtype=dtype)
        for a, b in row_chunks(s, rows, cols):  # decoding takes ~4 float copies: a slice at a time
            sa, za = _row_slice(scale, s, a, b), _row_slice(z, s, a, b)
            cg = group_view(codes[a:b].to(torch.float32), s).nan_to_num(0).to(torch.uint8)
            w = dequantize_grouped(cg, sa.unsqueeze(-1), None if za is None else za.unsqueeze(-1), s)
            out[a:b] = ungroup(w, b - a, cols)
        return out.reshape(self.shape)

    # ---- storage --------------------------------------------------------
    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "codes": self.codes, prefix + "scale": self.scale}
        if self.zero_point is not None:
            out[prefix + "zero_point"] = self.zero_point
        return out

    def meta(self) -> dict:
        return {"shape": list(self.shape), "scheme": self.scheme.to_dict()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "") -> "QuantizedTensor":
        scheme = Scheme.from_dict(meta["scheme"])
        qt = cls(
            codes=tensors[prefix + "codes"],
            scale=tensors[prefix + "scale"],
            zero_point=tensors.get(prefix + "zero_point"),
            shape=tuple(meta["shape"]),
            scheme=scheme,
        )
        qt.validate()
        return qt

    def validate(self) -> None:
        """Check stored sizes against the shape and scheme (catches corrupt files)."""
        want = packed_nbytes(self.numel, self.scheme.bits)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != want:
            raise ValueError(f"codes hold {self.codes.numel()} bytes, expected {want} for shape {self.shape} at {self.scheme.bits} bits")
        if tuple(self.scale.shape) != self.scale_shape:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} does not match {self.scale_shape} for {self.scheme.name}")
        if (self.zero_point is not None) != self.scheme.has_zero_point:
            raise ValueError(f"zero points {'present' if self.zero_point is not None else 'missing'} for scheme {self.scheme.name}")
        if self.scheme.float_zero and (tuple(self.zero_point.shape) != self.scale_shape
                                       or self.zero_point.dtype != self.scheme.scale_storage_dtype):
            raise ValueError(f"float zero points {tuple(self.zero_point.shape)} {self.zero_point.dtype} do not match "
                             f"{self.scale_shape} {self.scheme.scale_storage_dtype}")

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from lowbit.io.files import atomic_path

        with atomic_path(path) as tmp:
            save_file(self.tensors(), tmp, metadata={"lowbit.quantized_tensor": json.dumps(self.meta())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedTensor":
        from lowbit.io.files import read_safetensors

        tensors, metadata = read_safetensors(path)
        if "lowbit.quantized_tensor" not in metadata:
            raise ValueError(f"{path}: not a lowbit QuantizedTensor file (no 'lowbit.quantized_tensor' metadata)")
        return cls.from_tensors(tensors, json.loads(metadata["lowbit.quantized_tensor"]))

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={self.shape}, scheme={self.scheme.name!r}, "
                f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f})")


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if x.numel() == 0:
        raise UserError(f"{what} is empty (shape {tuple(x.shape)}); nothing to quantize")
    if not x.is_floating_point():
        raise UserError(f"{what} has dtype {x.dtype}; quantize floating-point tensors")
    flat = x.reshape(-1)
    n = sum(int((~torch.isfinite(flat[a:a + CHUNK_ELEMENTS])).sum()) for a in range(0, flat.numel(), CHUNK_ELEMENTS))
    if n:
        raise UserError(f"{what} contains {n} NaN/Inf value(s) of {x.numel()}; fix the source weights before quantizing")


# Quantizing or dequantizing makes several float32 temporaries the size of its input
# (grouped views, ranges, scaled values, rounded values): done on slices of rows of at
# most this many elements, the temporaries stay ~50 MB however large the weight (a
# 128256 x 4096 head would otherwise need ~20 GB). Rows are independent unless the
# scale is per tensor.
CHUNK_ELEMENTS = 1 << 21


def row_chunks(scheme: Scheme, rows: int, cols: int) -> list[tuple[int, int]]:
    if scheme.granularity == "tensor":
        return [(0, rows)]
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _row_slice(t: torch.Tensor | None, scheme: Scheme, a: int, b: int) -> torch.Tensor | None:
    """Rows a:b of a [scale_rows, groups] tensor (the whole of it for a per-tensor scale)."""
    return t if t is None or scheme.granularity == "tensor" else t[a:b]


def quantize_tensor(x: torch.Tensor, scheme: Scheme | str, *, scale: torch.Tensor | None = None,
                    zero_point: torch.Tensor | None = None, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` (any float tensor, reduction along its last dim) with `scheme`.

    `scale`/`zero_point` ([scale_rows, groups], float32) may be given to reuse
    parameters chosen elsewhere (e.g. by GPTQ); otherwise the scheme's scale method
    chooses them.
    """
    scheme = Scheme.parse(scheme)
    check_finite(x, name)
    if x.dim() == 0:
        raise ValueError(f"{name} is a scalar; quantize tensors with at least one dimension")
    x2 = as_2d(x.detach()).to(torch.float32)
    rows, cols = x2.shape
    fmt = scheme.number_format
    given = scale is not None
    if given and tuple(scale.shape) != num_groups(scheme, rows, cols):
        raise SchemeError(f"scale shape {tuple(scale.shape)} does not fit {scheme.name} on {tuple(x.shape)}")
    codes, scales, zps = torch.empty(rows, cols, dtype=torch.uint8), [], []
    for a, b in row_chunks(scheme, rows, cols):
        xa = x2[a:b]
        if given:
            sa, za = _row_slice(scale, scheme, a, b), _row_slice(zero_point, scheme, a, b)
        else:
            sa, za = choose_qparams(xa, scheme)
        scales.append(sa)
        zps.append(za)
        codes[a:b] = ungroup(encode_grouped(group_view(xa, scheme), sa.unsqueeze(-1),
                                            za.unsqueeze(-1) if za is not None else None, scheme), b - a, cols)
    if not given:
        scale = torch.cat(scales)
        zero_point = torch.cat(zps) if zps[0] is not None else None
    if not torch.isfinite(scale).all():  # a range the stored scale dtype cannot hold: NaN codes otherwise
        raise SchemeError(f"{name}: values up to {float(x2.abs().max()):.4g} need scales beyond what {scheme.scale_dtype} "
                          f"holds ({torch.finfo(scheme.scale_storage_dtype).max:.4g}); exclude this tensor (--exclude) "
                          f"or store its scales as float32 (Scheme(..., scale_dtype='float32'))")
    if scheme.scale_dtype == "e8m0":
        # scales arrive already rounded to powers of two: store the biased exponent
        stored_scale = (torch.log2(scale).round() + 127).to(torch.uint8)
    else:
        stored_scale = scale.to(scheme.scale_storage_dtype)
    zp = None
    if zero_point is not None and scheme.float_zero:
        zp = zero_point.to(scheme.scale_storage_dtype).contiguous()
    elif zero_point is not None:
        zp = pack_codes(zero_point.to(torch.uint8), fmt.bits)
    return QuantizedTensor(pack_codes(codes, fmt.bits), stored_scale.contiguous(), zp, tuple(x.shape), scheme)
