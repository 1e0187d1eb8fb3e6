"""llama.cpp importance matrices (imatrix GGUF files) in and out.

An imatrix holds, per weight tensor, the sum over calibration tokens of each input
channel's squared activation (`<tensor>.in_sum2`) and the token count (`<tensor>.counts`):
exactly the diagonal of the Hessian X^T X that lowbit's calibration collects. So either
tool can use the other's calibration: lowbit writes its statistics as an imatrix that
`llama-quantize --imatrix` takes, and reads llama-imatrix's files as per-channel
importance for its scale search (`quantize --imatrix`), the way llama.cpp uses them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.errors import UserError
from lowbit.io.files import GGUF_WRITER_KEY, atomic_path, check_output


def _names(config, modules) -> dict[str, str]:
    """{GGUF tensor name (blk.N.attn_q.weight): HF module name} for `modules`."""
    from lowbit.io.interop.gguf_io import tensor_name_map

    tmap = tensor_name_map(config)
    out = {}
    for name in modules:
        g = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if g is not None:
            out[g] = name
    return out


def check_names(config, modules) -> dict[str, str]:
    """{HF Linear name: GGUF tensor name} for every module, or a one-line error naming one without."""
    from lowbit.io.interop.gguf_io import gguf_arch

    names = {hf: g for g, hf in _names(config, modules).items()}
    missing = sorted(set(modules) - set(names))
    if missing:
        raise UserError(f"{missing[0]}: no GGUF tensor name in the {gguf_arch(config)[0]} layout, so no imatrix entry "
                        f"(imatrix files cover dense models for now)")
    return names


def write_imatrix(path: str | Path, config, sums: dict[str, tuple[torch.Tensor, int]], *, dataset: str,
                  chunks: int, chunk_size: int) -> int:
    """Write {HF Linear name: (sum of x^2 per input channel, tokens)} as an imatrix GGUF; returns entries."""
    import gguf

    from lowbit.io.interop.gguf_io import gguf_arch

    names = check_names(config, sums)
    path = check_output(path, file=True)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch=gguf_arch(config)[0])
        w.add_string("general.type", "imatrix")
        w.add_string(GGUF_WRITER_KEY, "lowbit")  # a later write may replace it
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for hf in sorted(sums, key=lambda n: names[n]):  # llama.cpp's own order: by tensor name
            s, n = sums[hf]
            g = names[hf]
            w.add_tensor(f"{g}.in_sum2", s.to(torch.float32).numpy().reshape(1, -1))
            w.add_tensor(f"{g}.counts", np.array([[float(n)]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return len(sums)


def read_imatrix(path: str | Path, config, modules) -> dict[str, torch.Tensor]:
    """{HF Linear name: mean x^2 per input channel} from an imatrix GGUF (what llama-quantize
    divides out: in_sum2 / counts), for the `modules` it has entries for."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable imatrix GGUF ({e}); lowbit reads llama-imatrix's .gguf files") from None
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise UserError(f"{path}: a GGUF file, but not an importance matrix (general.type is not 'imatrix')")
    # GGUF lists dimensions innermost first: in_sum2 is [channels, matrices], counts [1, matrices]
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(int(np.prod(t.shape[1:])), int(t.shape[0]))
               for t in reader.tensors}
    out = {}
    for g, hf in _names(config, modules).items():
        s, n = tensors.get(f"{g}.in_sum2"), tensors.get(f"{g}.counts")
        if s is None or n is None:
            continue
        if s.shape[0] != 1:
            raise UserError(f"{path}: {g} has per-expert statistics; lowbit reads dense-model imatrices for now")
        cols = s.shape[-1]
        if cols != modules[hf]:
            raise UserError(f"{path}: {g} has {cols} input channels, the model's {hf} has {modules[hf]}")
        out[hf] = torch.from_numpy(s.reshape(-1) / max(float(n.reshape(-1)[0]), 1.0))
    if not out:
        raise UserError(f"{path}: no entry matches this model's Linear layers (is it another model's imatrix?)")
    return out
