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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside `path`; it replaces `path` only on success."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
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
