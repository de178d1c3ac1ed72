"""Writing files so a reader never sees half of one: temp file in the same folder, then rename.

Temp files are named ``.NAME.PID.XXXXXXXX.tmp``: ``remove_stale_temps`` deletes those whose
writer is no longer alive (a run killed mid-write), and nothing else.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

_TEMP = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.replace(tmp, path)
        except OSError as exc:  # e.g. a folder in the way: name the file, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: str | Path):
    """Inside: an ``OSError`` that names no file (a failed write, a full disk) names ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | Path) -> int:
    """Delete the temp files of killed writers under ``folder``; returns how many."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp") if Path(folder).is_dir() else ():
        match = _TEMP.match(path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def safetensors_loads(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file whose every tensor loads (a truncated one does not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        return False
    return True
