"""GGUF block bytes <-> lowbit codes and scales, for every type lowbit writes.

Each GGUF type is a lowbit scheme exactly (`GGUF_PRESETS`); converting only moves bits:

    type    bytes/block  elements  w =                    lowbit code
    Q8_0    34           32        d * q                  q + 128       (int8)
    Q5_0    22           32        d * (q - 16)           q             (int5, signed)
    Q5_1    24           32        d * q + m              q             (int5, float zero)
    Q4_0    18           32        d * (q - 8)            q             (int4, signed)
    Q4_1    20           32        d * q + m              q             (int4, float zero)
    IQ4_NL  18           32        d * kvalues[q]         q             (iq4nl table)
    Q6_K    210          256       d*sc * (q - 32), /16   q             (int6, int8 sc)
    Q5_K    176          256       d*sc * q - dmin*m, /32 q             (int5, 6-bit sc, m)
    Q4_K    144          256       d*sc * q - dmin*m, /32 q             (int4, 6-bit sc, m)
    IQ4_XS  136          256       d*(ls-32) * kvalues[q] q             (iq4nl, 6-bit ls)
    Q3_K    110          256       d*(sc-32) * (q - 4)    q             (int3, 6-bit sc)
    Q2_K    84           256       d*sc * q - dmin*m, /16 q             (int2, 4-bit sc, m)

K-quant scales live in lowbit as their exact fp32 products (d*sc, -dmin*m); writing
factors them back into the fp16 factor and the small integers (`_factor`). The bit
layouts follow ggml's block structs (ggml-common.h); the tests hold every type to the
`gguf` package's own dequantizer.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.core.scheme import GGUF_PRESETS, Scheme
from lowbit.core.tensor import QuantizedTensor, pack_codes
from lowbit.errors import UserError

# GGML type name -> (lowbit preset, elements per block, bytes per block)
LAYOUT = {
    "Q8_0": ("q8_0", 32, 34), "Q5_0": ("q5_0", 32, 22), "Q5_1": ("q5_1", 32, 24), "Q4_0": ("q4_0", 32, 18),
    "Q4_1": ("q4_1", 32, 20), "IQ4_NL": ("iq4_nl", 32, 18), "Q6_K": ("q6_k", 256, 210), "Q5_K": ("q5_k", 256, 176),
    "Q4_K": ("q4_k", 256, 144), "IQ4_XS": ("iq4_xs", 256, 136), "Q3_K": ("q3_k", 256, 110), "Q2_K": ("q2_k", 256, 84),
}


class NotExact(UserError):
    pass


def _storage_key(s: Scheme) -> tuple:
    """What a scheme stores (how its scales were chosen does not matter)."""
    return (s.format, s.symmetric, s.granularity, s.group_size, s.scale_dtype, s.zero_domain, s.activations,
            s.super_block, s.scale_bits)


def type_name_for(scheme: Scheme) -> str | None:
    """The GGML type name that holds `scheme` bit for bit, or None."""
    for tname, (preset, _, _) in LAYOUT.items():
        if _storage_key(GGUF_PRESETS[preset]) == _storage_key(scheme):
            return tname
    return None


# ---- small bit helpers ----------------------------------------------------------

def _f16(x: np.ndarray) -> np.ndarray:
    """[n] or [n, 1] -> [n, 2] bytes."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], 2)


def _read_f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(c: np.ndarray) -> np.ndarray:
    """[..., 32] 4-bit values -> [..., 16] bytes: element j low, element j + 16 high."""
    return (c[..., :16] & 0x0F) | ((c[..., 16:] & 0x0F) << 4)


def _unnibble(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0x0F, b >> 4], axis=-1)


def _bits_le(bits: np.ndarray) -> np.ndarray:
    """[..., 8k] 0/1 -> [..., k] bytes, least significant bit first."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def _unbits_le(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little")


def _factor(v: np.ndarray, top: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 products v [n, k] = d * q (d fp16 per row, q integers in [lo, top]) -> (d, q).

    The largest |v| of a row is |d| times one of 1..max(top, -lo), so d is one of those
    quotients (either sign on a signed range: llama.cpp maps the largest scale to -128 or
    -32 with a negative d); the smallest |d| that makes every entry an exact in-range
    multiple wins."""
    n = v.shape[0]
    d = np.zeros(n, np.float32)
    q = np.zeros_like(v, dtype=np.int32)
    done = np.all(v == 0, axis=1)
    vmax = np.abs(v).max(axis=1)
    for k in range(max(top, -lo), 0, -1):
        for sign in (1, -1) if lo < 0 else (1,):
            cand = (sign * vmax / k).astype(np.float16).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                qc = np.rint(v / cand[:, None])
            ok = ~done & (cand != 0) & np.all((qc >= lo) & (qc <= top) & (qc * cand[:, None] == v), axis=1)
            d[ok], q[ok] = cand[ok], qc[ok].astype(np.int32)
            done |= ok
    if not done.all():
        raise NotExact(f"scales are not fp16 x {lo}..{top} products (not made by a K-quant scheme)")
    return d, q


# ---- per type: (codes [n, QK], scale [n, G], zero [n, G] | None) <-> bytes [n, B] ----------

def _enc(tname: str, c: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    n = c.shape[0]
    if tname == "Q8_0":
        return np.concatenate([_f16(s), (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    if tname in ("Q4_0", "IQ4_NL"):
        return np.concatenate([_f16(s), _nibbles(c)], axis=1)
    if tname == "Q4_1":
        return np.concatenate([_f16(s), _f16(z), _nibbles(c)], axis=1)
    if tname in ("Q5_0", "Q5_1"):
        head = [_f16(s)] if z is None else [_f16(s), _f16(z)]
        return np.concatenate([*head, _bits_le(c >> 4), _nibbles(c)], axis=1)
    if tname == "Q6_K":
        d, sc = _factor(s, 127, -128)
        h = c.reshape(n, 2, 128)
        ql = (h[..., :64] & 0x0F) | ((h[..., 64:] & 0x0F) << 4)
        qh = sum(((h[..., 32 * k:32 * k + 32] >> 4) & 3) << (2 * k) for k in range(4))
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64).astype(np.uint8),
                               sc.astype(np.int8).view(np.uint8), _f16(d)], axis=1)
    if tname in ("Q4_K", "Q5_K"):
        d, sc = _factor(s, 63, 0)
        dmin, m = _factor(-z, 63, 0)
        chunks = c.reshape(n, 4, 2, 32)
        qs = ((chunks[:, :, 0] & 0x0F) | ((chunks[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
        body = [_f16(d), _f16(dmin), _pack_k4_scales(sc, m)]
        if tname == "Q5_K":  # bit j of qh[l]: the fifth bit of element 32*j + l
            body.append(_bits_le((c.reshape(n, 8, 32) >> 4).transpose(0, 2, 1)).reshape(n, 32))
        return np.concatenate([*body, qs], axis=1)
    if tname == "IQ4_XS":
        d, ls = _factor(s, 31, -32)
        ls = (ls + 32).astype(np.uint8)
        low = (ls[:, 0::2] & 0x0F) | ((ls[:, 1::2] & 0x0F) << 4)
        high = _bits_le(np.stack([(ls >> 4) & 1, (ls >> 5) & 1], axis=-1).reshape(n, 16))
        return np.concatenate([_f16(d), high, low, _nibbles(c.reshape(n, 8, 32)).reshape(n, 128)], axis=1)
    if tname in ("Q3_K", "Q2_K"):  # element 128h + 32j + t: 2 low bits at qs[32h + t] >> 2j
        h = c.reshape(n, 2, 4, 32)
        qs = sum((h[:, :, j] & 3) << (2 * j) for j in range(4)).reshape(n, 64).astype(np.uint8)
        if tname == "Q2_K":
            d, sc = _factor(s, 15, 0)
            dmin, m = _factor(-z, 15, 0)
            return np.concatenate([(sc | (m << 4)).astype(np.uint8), qs, _f16(d), _f16(dmin)], axis=1)
        d, sc = _factor(s, 31, -32)
        hmask = _bits_le((h >> 2).reshape(n, 8, 32).transpose(0, 2, 1)).reshape(n, 32)  # bit 4h+j of hmask[t]
        return np.concatenate([hmask, qs, _pack_q3_scales((sc + 32).astype(np.uint8)), _f16(d)], axis=1)
    raise AssertionError(tname)


def _dec(tname: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    if tname == "Q8_0":
        return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _read_f16(b[:, 0:2])[:, None], None
    if tname in ("Q4_0", "IQ4_NL"):
        return _unnibble(b[:, 2:]), _read_f16(b[:, 0:2])[:, None], None
    if tname == "Q4_1":
        return _unnibble(b[:, 4:]), _read_f16(b[:, 0:2])[:, None], _read_f16(b[:, 2:4])[:, None]
    if tname in ("Q5_0", "Q5_1"):
        o = 2 if tname == "Q5_0" else 4
        c = _unnibble(b[:, o + 4:]) | (_unbits_le(b[:, o:o + 4]) << 4)
        return c, _read_f16(b[:, 0:2])[:, None], None if o == 2 else _read_f16(b[:, 2:4])[:, None]
    if tname == "Q6_K":
        ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)
        high = np.concatenate([(qh >> (2 * k)) & 3 for k in range(4)], axis=-1)
        sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        return (low | (high << 4)).reshape(n, 256), _read_f16(b[:, 208:210])[:, None] * sc, None
    if tname in ("Q4_K", "Q5_K"):
        d, dmin = _read_f16(b[:, 0:2])[:, None], _read_f16(b[:, 2:4])[:, None]
        sc, m = _unpack_k4_scales(b[:, 4:16])
        qs = b[:, -128:].reshape(n, 4, 32)
        c = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)
        if tname == "Q5_K":
            c = c | (_unbits_le(b[:, 16:48].reshape(n, 32, 1)).reshape(n, 32, 8).transpose(0, 2, 1).reshape(n, 256) << 4)
        return c, d * sc, -(dmin * m)
    if tname == "IQ4_XS":
        d = _read_f16(b[:, 0:2])[:, None]
        high = _unbits_le(b[:, 2:4]).reshape(n, 8, 2)
        low = np.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], axis=-1).reshape(n, 8)
        ls = low.astype(np.int32) | (high[..., 0].astype(np.int32) << 4) | (high[..., 1].astype(np.int32) << 5)
        return _unnibble(b[:, 8:].reshape(n, 8, 16)).reshape(n, 256), d * (ls - 32), None
    if tname in ("Q3_K", "Q2_K"):
        qs = b[:, 32:96] if tname == "Q3_K" else b[:, 16:80]
        low = np.stack([(qs.reshape(n, 2, 32) >> (2 * j)) & 3 for j in range(4)], axis=2).reshape(n, 256)
        if tname == "Q2_K":
            d, dmin = _read_f16(b[:, 80:82])[:, None], _read_f16(b[:, 82:84])[:, None]
            return low, d * (b[:, :16] & 0x0F), -(dmin * (b[:, :16] >> 4))
        high = _unbits_le(b[:, :32].reshape(n, 32, 1)).reshape(n, 32, 8).transpose(0, 2, 1).reshape(n, 256)
        sc = _unpack_q3_scales(b[:, 96:108]).astype(np.int32) - 32
        return low | (high << 2), _read_f16(b[:, 108:110])[:, None] * sc, None
    raise AssertionError(tname)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4, inverted)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _unpack_k4_scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """16 six-bit values -> 12 bytes: low nibbles of 0-7 | 8-15, then the high 2 bits of j, 4+j, 8+j, 12+j."""
    out = np.zeros((s.shape[0], 12), np.uint8)
    out[:, 0:4] = (s[:, 0:4] & 0x0F) | ((s[:, 8:12] & 0x0F) << 4)
    out[:, 4:8] = (s[:, 4:8] & 0x0F) | ((s[:, 12:16] & 0x0F) << 4)
    out[:, 8:12] = (s[:, 0:4] >> 4) | ((s[:, 4:8] >> 4) << 2) | ((s[:, 8:12] >> 4) << 4) | ((s[:, 12:16] >> 4) << 6)
    return out


def _unpack_q3_scales(q: np.ndarray) -> np.ndarray:
    low = np.concatenate([q[:, 0:4] & 0x0F, q[:, 4:8] & 0x0F, q[:, 0:4] >> 4, q[:, 4:8] >> 4], axis=1)
    high = np.concatenate([(q[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1)
    return low | (high << 4)


# ---- whole tensors -------------------------------------------------------------------

def qtensor_from_blocks(raw: np.ndarray, tname: str, shape: tuple[int, int]) -> QuantizedTensor:
    """GGUF block bytes [rows, row_bytes] -> QuantizedTensor, without touching a value."""
    if tname not in LAYOUT:
        raise UserError(f"GGUF type {tname} has no exact lowbit scheme ({', '.join(LAYOUT)} do)")
    preset, qk, nbytes = LAYOUT[tname]
    rows, cols = shape
    if cols % qk:
        raise UserError(f"GGUF {tname} tensor with {cols} columns is not made of {qk}-element blocks")
    b = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8)).reshape(rows * cols // qk, nbytes)
    c, s, z = _dec(tname, b)
    scheme = GGUF_PRESETS[preset]
    dt = scheme.scale_storage_dtype
    scale = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).reshape(rows, -1).to(dt)
    zero = None if z is None else torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).reshape(rows, -1).to(dt)
    codes = torch.from_numpy(np.ascontiguousarray(c, dtype=np.uint8)).reshape(rows, cols)
    qt = QuantizedTensor(pack_codes(codes, scheme.bits), scale, zero, (rows, cols), scheme)
    qt.validate()
    return qt


def blocks_from_qtensor(qt: QuantizedTensor) -> tuple[np.ndarray, str]:
    """QuantizedTensor -> (GGUF block bytes [rows, row_bytes], GGML type name); exact or NotExact."""
    tname = type_name_for(qt.scheme)
    rows, cols = qt.shape if len(qt.shape) == 2 else (1, qt.shape[0])
    qk = LAYOUT[tname][1] if tname else 0
    if tname is None or cols % qk:
        raise NotExact(f"{qt.scheme.name} on {tuple(qt.shape)} has no exact GGUF type "
                       f"(exact: {', '.join(LAYOUT[t][0] for t in LAYOUT)} on rows their block size divides)")
    n = rows * cols // qk
    c = qt.unpacked_codes().reshape(n, qk).numpy()
    s = qt.scales().reshape(n, -1).numpy()
    z = qt.zero_points()
    z = None if z is None else z.reshape(n, -1).numpy()
    return _enc(tname, c, s, z).reshape(rows, -1), tname
