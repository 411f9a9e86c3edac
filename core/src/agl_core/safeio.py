"""Crash-safe file writes (temp file + fsync + os.replace) and hashing of tensor bytes."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Union

import torch

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".agl-tmp"


def _temp_dir(target: Path) -> Path:
    # .<name>.<pid>.<random>.agl-tmp/ in the target's folder: same file system, so os.replace is atomic;
    # a private folder also catches temp files that the writing library makes next to its output.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): leave its file alone
    return True


def clean_stale_temps(target: PathLike) -> list[str]:
    """Remove temp folders left next to `target` by writers that died (their pid is gone); returns them."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}."
    for entry in target.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid_part = name[len(prefix):-len(TMP_SUFFIX)].split(".")[0]
        if pid_part.isdigit() and _pid_alive(int(pid_part)):
            continue
        _remove(entry)
        removed.append(str(entry))
    return removed


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # e.g. Windows cannot open folders; the rename is still atomic there
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """Write `path` atomically: `write(tmp_path)` fills a temp file (in a private temp folder next to `path`),
    which is fsynced and renamed over `path`; then the folder is fsynced.

    A reader sees either the old file or the complete new one, never a partial file, even if the
    writer is killed. Temp files of killed writers are removed on the next write to the same path.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"Cannot write file {str(target)!r}: a folder with that name exists. Choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp_dir = _temp_dir(target)
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / target.name
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # writers that use mkstemp leave 0600; give the user's usual mode
        _fsync_path(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _fsync_path(target.parent, directory=True)
    return str(target)


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """atomic_write for an in-memory payload."""

    def _write(tmp: str) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)

    return atomic_write(path, _write)


def append_durably(path: PathLike, data: bytes) -> None:
    """Append `data` to `path` with one O_APPEND write loop, then fsync: after a kill the record (e.g. one or more
    JSON lines) is there or it is not, and concurrent appenders never interleave inside it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def update_hash(hasher, tensor: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (CPU, contiguous, native little-endian layout) into a hashlib object."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return
    # A zero-copy view of the tensor's memory; `t` stays alive for the duration of the call.
    buf = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    hasher.update(memoryview(buf))
