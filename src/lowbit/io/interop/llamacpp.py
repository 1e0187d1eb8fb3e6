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


if __name__ == "__main__":
    build()
