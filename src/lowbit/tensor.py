"""QuantizedTensor: packed integer codes, scales, zero points and the Scheme."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .observe import as_2d, choose_qparams, dequantize_grouped, encode_grouped, group_view, num_groups, ungroup
from .errors import UserError
from .scheme import Scheme, SchemeError



# ---- bit packing ------------------------------------------------------------
# Codes are packed densely, little-endian: code i occupies bits [i*b, (i+1)*b) of the
# stream. Eight codes of b bits are exactly b bytes, so we pack in chunks of eight
# (two 4-bit codes per byte, 3-bit codes at 8 per 3 bytes, ...) and drop the unused
# tail bytes of the last chunk: the stream is exactly ceil(numel * bits / 8) bytes.

def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) of any shape -> flat uint8 stream of packed_nbytes bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes (1..8 bits)")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n = flat.numel()
    pad = (-n) % 8
    c = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # 8*bits <= 56 bits: fits in int64 with no carries
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    stream = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return stream[: packed_nbytes(n, bits)].clone()


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 stream -> flat uint8 codes (numel of them)."""
    if bits == 8:
        return packed[:numel]
    if bits in (1, 2, 4):  # codes never straddle a byte: shift within uint8
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    wide = torch.int32 if bits <= 3 else torch.int64  # 8 codes = 8*bits bits per word
    b = packed.to(wide)
    b = torch.nn.functional.pad(b, (0, (-b.numel()) % bits)).reshape(-1, bits)
    words = (b << (torch.arange(bits, dtype=wide) * 8)).sum(-1, dtype=wide)
    shifts = torch.arange(8, dtype=wide) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


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
        codes = self.unpacked_codes()
        rows, cols = math.prod(self.shape[:-1]), self.shape[-1]
        cg = group_view(as_2d(codes).to(torch.float32), s).nan_to_num(0).to(torch.uint8)
        z = self.zero_points()
        w = dequantize_grouped(cg, self.scales().unsqueeze(-1), None if z is None else z.unsqueeze(-1), s)
        return ungroup(w, rows, cols).reshape(self.shape).to(dtype)

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

        from .io import atomic_path

        with atomic_path(path) as tmp:
            save_file(self.tensors(), tmp, metadata={"lowbit.quantized_tensor": json.dumps(self.meta())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedTensor":
        from .io import read_safetensors

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
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n = int(bad.sum())
        raise UserError(f"{what} contains {n} NaN/Inf value(s) of {x.numel()}; fix the source weights before quantizing")


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
    if scale is None:
        scale, zero_point = choose_qparams(x2, scheme)
    if tuple(scale.shape) != num_groups(scheme, rows, cols):
        raise SchemeError(f"scale shape {tuple(scale.shape)} does not fit {scheme.name} on {tuple(x.shape)}")
    fmt = scheme.number_format
    xg = group_view(x2, scheme)
    z = zero_point.unsqueeze(-1) if zero_point is not None else None
    codes = ungroup(encode_grouped(xg, scale.unsqueeze(-1), z, scheme), rows, cols)
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
