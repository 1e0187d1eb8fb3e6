"""llama.cpp's own tools, built from the source the `llama-cpp-python` sdist vendors.

llama.cpp is lowbit's reader of record for GGUF (does the engine load what lowbit wrote,
and compute what lowbit computes?) and its peer in benchmarks. It is never on lowbit's
quantization path.

The build is pinned (sdist version), uses explicit ISA flags read from /proc/cpuinfo
(GGML_NATIVE=ON built binaries that crashed on quantized types on an AMX host), and is
cached under lowbit's cache dir keyed by version and flags, so a host with another ISA
gets its own build. `python -m lowbit.io.interop.llamacpp` builds (about 8 minutes on
2 cores) or reports the cached build.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lowbit.errors import UserError
from lowbit.evaluate.host import cpu_flags
from lowbit.io.files import wait_lock
from lowbit.paths import cache_dir

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-imatrix")

# /proc/cpuinfo flag -> ggml CMake option. AMX stays off: it is what the crashing native build added.
_ISA = (("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
        ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
        ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"))


def cmake_options(flags: set[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    isa = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in _ISA]
    return ["-DGGML_NATIVE=OFF", *isa, "-DGGML_SSE42=" + ("ON" if "sse4_2" in flags else "OFF"),
            "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release"]


def build_dir() -> Path:
    key = hashlib.sha256(json.dumps([SDIST, cmake_options(), TOOLS]).encode()).hexdigest()[:12]
    return cache_dir() / "llama.cpp" / f"{SDIST.split('==')[1]}-{key}"


def tool(name: str) -> Path | None:
    """Path of a built llama.cpp tool, or None when it has not been built on this host."""
    p = build_dir() / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def require(name: str) -> Path:
    p = tool(name)
    if p is None:
        raise UserError(f"llama.cpp's {name} is not built on this host; run `python -m lowbit.io.interop.llamacpp`")
    return p


def build(jobs: int | None = None, log=print) -> Path:
    """Download the sdist, build TOOLS, install them under build_dir()/bin. Cached."""
    out = build_dir()
    with wait_lock(out.parent / f".{out.name}.lowbit-build-lock"):  # one build per key at a time
        if not all(tool(t) for t in TOOLS):
            _build(out, jobs, log)
    return out


def _build(out: Path, jobs: int | None, log) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:  # the registry's cmake wheel, into the running environment
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
        cmake = str(Path(sys.executable).parent / "cmake")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        log(f"llama.cpp: downloading {SDIST} (sdist)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(tmp)], check=True)
        (archive,) = tmp.glob("*.tar.gz")
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
            tf.extractall(tmp, members=members, filter="data")
        (src,) = tmp.glob("*/vendor/llama.cpp")
        opts = cmake_options()
        log(f"llama.cpp: configuring with {' '.join(o for o in opts if o.endswith('=ON'))}")
        _quiet([cmake, "-S", str(src), "-B", str(tmp / "build"), *opts], tmp / "build.log")
        log(f"llama.cpp: building {', '.join(TOOLS)} (several minutes)")
        _quiet([cmake, "--build", str(tmp / "build"), "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS],
               tmp / "build.log")
        stage = tmp / "install"
        (stage / "bin").mkdir(parents=True)
        for t in TOOLS:
            shutil.copy2(tmp / "build" / "bin" / t, stage / "bin" / t)
        (stage / "build.json").write_text(json.dumps({"sdist": SDIST, "cmake": opts}, indent=1))
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier build of ours (this key's directory is lowbit's)
        stage.rename(out)
    log(f"llama.cpp: tools in {out / 'bin'}")


def _quiet(cmd: list[str], logfile: Path) -> None:
    """Run a build step into `logfile`; on failure, raise with its last lines."""
    with open(logfile, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"llama.cpp build step failed ({' '.join(cmd[:3])} ...):\n{tail}")


def run(name: str, *args, timeout: float = 1800, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run a built tool; a failure raises with the tool's own last lines."""
    cmd = [str(require(name)), *map(str, args)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{name} exited {r.returncode}:\n{tail}")
    return r


def bench(model: Path, *, prompt: int = 128, gen: int = 64, reps: int = 3, threads: int = 2) -> dict:
    """llama-bench on one GGUF file: its mean prefill (a `prompt`-token prompt; none for 0) and
    decode tokens/s."""
    out = run("llama-bench", "-m", model, "-p", prompt, "-n", gen, "-r", reps, "-o", "json", threads=threads)
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0) if prompt else None
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prefill_tokens_per_s": pp["avg_ts"] if pp else None, "decode_tokens_per_s": tg["avg_ts"],
            "type": tg.get("model_type")}


def log_probs(model: Path, text: Path, *, ctx: int = 128, chunks: int = 4, threads: int = 2):
    """llama.cpp's own next-token log-probabilities for `model` on `text`, as llama-perplexity
    scores it: (tokens [chunks, ctx] with the BOS it puts first when the vocabulary asks for one,
    log-probs [chunks, ctx - 1 - ctx // 2, vocab] for positions ctx // 2 .. ctx - 2).

    Read from the file `--kl-divergence-base` writes ("_logits_", n_ctx, n_vocab, n_chunk, the
    tokens, then per scored position a float32 scale and minimum and one uint16 per token:
    log p = minimum + scale * q, to 16/65535 nats over the top 16 nats)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "base.kld"
        run("llama-perplexity", "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-b", ctx,
            "--kl-divergence-base", out, threads=threads, timeout=1800)
        raw = out.read_bytes()
    if raw[:8] != b"_logits_":
        raise RuntimeError(f"{model}: llama-perplexity wrote no logits file")
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, np.int32, 3, 8)
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx).copy()
    nv = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw, np.uint16, n_chunk * scored * nv, 20 + 4 * n_chunk * n_ctx).reshape(-1, nv)
    head = rows[:, :4].copy().view(np.float32)  # (scale, minimum) per position
    q = rows[:, 4:4 + n_vocab].astype(np.float32)
    lp = np.where(q > 0, head[:, 1:2] + head[:, 0:1] * q, -np.inf)  # 0: at or below the minimum kept
    import gguf

    fields = gguf.GGUFReader(model).fields  # one read of the header for both keys
    if "tokenizer.ggml.add_bos_token" in fields and fields["tokenizer.ggml.add_bos_token"].contents():
        tokens[:, 0] = fields["tokenizer.ggml.bos_token_id"].contents()
    return tokens, lp.reshape(n_chunk, scored, n_vocab)


if __name__ == "__main__":
    build()
