"""The one atomic-write helper every writer of the harness uses.

A file is written to a temporary name in its own folder and renamed into place with
``os.replace`` (atomic within one directory, also on NFS, with no lock needed), so a reader or
a run killed at any moment sees the old file or the new one, never a part. On any error the
temporary file is removed.

The temporary file is created as ``open(path, "w")`` creates a file: mode 0666, which the kernel
reduces by the process umask (or a folder's default ACL), so a ``cache_dir`` or a run folder
shared by a lab stays readable by the group that shares it. (``tempfile.mkstemp`` would make it
owner-only, 0600, and a ``chmod`` afterwards would override a default ACL.)

A process killed (SIGKILL) inside a write cannot remove its temporary file. Temporary names carry
the writer's host and process id, so :func:`remove_stale_temps` can tell a dead writer's file
from one still being written by a live process (of any host, sharing the folder over NFS).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

TMP_PREFIX = ".tmp-"
# A temporary file of another host is taken for stale after this long (a write takes seconds).
STALE_SECONDS = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:64] or "host"


def _create_temp(folder: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty file in ``folder`` opened for writing, with an unused name
    ``.tmp-<pid>~<host>~<random><suffix>``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}~{_HOST}~{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary file name in {folder}")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> Path:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not its subfolders): those
    of this host whose process is gone, and any older than ``max_age`` seconds. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    now = time.time()
    for e in entries:
        if not e.name.startswith(TMP_PREFIX) or not e.is_file(follow_symlinks=False):
            continue
        pid, _, rest = e.name[len(TMP_PREFIX):].partition("~")
        host = rest.partition("~")[0]
        try:
            stale = (host == _HOST and pid.isdigit() and not _alive(int(pid))) or now - e.stat().st_mtime > max_age
            if stale:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def save_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, data)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default, allow_nan=True).encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
