"""Writing files so a reader never sees half of one: temp file in the same folder, then rename.

Temp files are named ``.NAME.PID.XXXXXXXX.tmp``: ``remove_stale_temps`` deletes those whose
writer is no longer alive (a run killed mid-write), and nothing else.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
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


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_defect(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, from its header alone (no tensor is read),
    or None: the header is JSON within the file, every tensor's byte range matches its dtype and
    shape, and the last one ends where the file does (a truncated or padded file does not)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"its header length {length} runs past the file's {size} bytes"
            header = json.loads(f.read(length))
        end = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            start, stop = (int(v) for v in t["data_offsets"])
            count = math.prod(int(d) for d in t["shape"])
            if stop - start != count * _DTYPE_BYTES[t["dtype"]]:
                return f"tensor {name} holds {stop - start} bytes, its dtype and shape need {count * _DTYPE_BYTES[t['dtype']]}"
            end = max(end, stop)
    except OSError as exc:
        return exc.strerror or str(exc)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        return "its header is not a safetensors header"
    if 8 + length + end != size:
        return f"{size} bytes, its header says {8 + length + end}"
    return None


def safetensors_loads(path: str | Path) -> bool:
    """True when ``path`` is a complete safetensors file (``safetensors_defect``)."""
    return safetensors_defect(path) is None
