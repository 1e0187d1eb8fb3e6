"""File I/O that loses nothing: atomic writes, checked safetensors reads."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from lowbit.errors import UserError


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


MARKER = ".lowbit-output"  # in every directory lowbit writes: what may be replaced by a later run


def is_lowbit_output(path: Path) -> bool:
    """A directory lowbit wrote (its marker, or the lowbit.json of outputs made before the marker)."""
    return path.is_dir() and ((path / MARKER).is_file() or (path / "lowbit.json").is_file())


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def check_output(out: str | os.PathLike, *, file: bool = False, sources=(), flag: str = "--out") -> Path:
    """Fail before any work if `out` cannot be written or holds something lowbit did not
    create: lowbit replaces only its own outputs, and never a source (or a folder around one)."""
    out = Path(out)
    for src in sources:
        if src and Path(src).exists() and _same_or_inside(out, Path(src)):
            raise UserError(f"{flag} {out} is (or holds) the source {src}; choose another {flag}")
    if file:
        if out.is_dir():
            raise UserError(f"{flag} {out} is a directory; give a file name")
        if out.exists() and not _lowbit_file(out):
            raise UserError(f"{flag} {out} exists and was not written by lowbit; choose a new file name")
    elif out.exists():
        if not out.is_dir():
            raise UserError(f"{flag} {out} exists and is a file; choose a directory")
        if any(out.iterdir()) and not is_lowbit_output(out):
            raise UserError(f"{flag} {out} exists and was not written by lowbit; choose an empty or new directory "
                            f"(lowbit replaces only its own outputs)")
    try:  # permission bits lie (root, read-only mounts, /proc): really create something
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out.parent}: not writable ({e.strerror}); choose another {flag}") from None
    return out


def _lowbit_file(path: Path) -> bool:
    """A single-file output lowbit wrote: a GGUF whose metadata names lowbit as its writer."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get(GGUF_WRITER_KEY)
        return field is not None and bytes(field.parts[field.data[0]]).decode() == "lowbit"
    except Exception:  # not a GGUF, or a damaged one: not ours to replace
        return False


GGUF_WRITER_KEY = "general.quantized_by"


@contextlib.contextmanager
def wait_lock(lock: Path):
    """Wait for, then hold, an flock on the file `lock` (the kernel drops it if the holder dies)."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike):
    """Hold an exclusive lock on `out` (and so on its work folder) for a run: a second run to
    the same output is a one-line error naming the process that holds it."""
    import fcntl

    out = Path(out)
    lock = out.parent / f".{out.name}.lowbit-lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{out} is being written by another lowbit run (pid {holder}); wait for it or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside `path`; on success it takes `path`'s place in one
    rename. What was at `path` is removed only if lowbit wrote it (check_output)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by lowbit; a later lowbit run may replace this directory\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        for f in tmp.rglob("*"):  # and safetensors' save_file 0600: outputs get the usual permissions
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        old = None
        if path.exists():
            if path.is_dir() and any(path.iterdir()) and not is_lowbit_output(path):
                raise UserError(f"{path} appeared while lowbit was writing and was not written by lowbit; "
                                f"the output is left in {tmp}")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except UserError:
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def read_safetensors(path: str | os.PathLike):
    """(tensors, metadata) from a safetensors file, with one clear error if it is unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers/data
        raise UserError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, metadata


DISK_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG (a file size limit), EDQUOT


def disk_full_error(path, e: BaseException) -> UserError | None:
    """A UserError for an out-of-space write (OSError or safetensors' own error), else None."""
    import errno as _errno

    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        why = _errno.errorcode.get(e.errno, str(e.errno))
    elif type(e).__name__ == "SafetensorError" and any(f"os error {n})" in str(e) for n in DISK_ERRNOS):
        why = str(e).rsplit(":", 1)[-1].strip()
    else:
        return None
    return UserError(f"disk full (or a file size limit) while writing {path} ({why}); finished work is kept: "
                     f"free space and run the same command again to resume")


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.save_file, atomically, with one clear error when the disk is full."""
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except Exception as e:
        err = disk_full_error(path, e)
        if err is None:
            raise
        raise err from None
