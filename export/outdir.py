"""Where a bundle goes: what ``--out`` may replace, the staging folder, the swap into place.

Rules (a user's files are never lost):

- ``--out`` may name nothing yet, an empty folder, or a QuBLAST bundle (a ``manifest.json`` of
  the bundle format that lists every file the folder holds, engine plans built on the device
  aside). A file, a symbolic link or any other folder is replaced only with ``--overwrite``.
- Never, not even with ``--overwrite``: the current directory, the home folder or a folder above
  either, and any
  input of the run (the model, a recipe, the texts, the cache) or a folder above one.
- The bundle is assembled in ``.NAME.qublast-PID`` beside ``--out`` (mode 0755) and swapped
  into place in one step (``renameat2(RENAME_EXCHANGE)`` on Linux); what was at ``--out``
  before is removed only after that. A run killed at any point leaves either the previous
  content of ``--out`` or the new bundle there; its staging folder (and, where the swap had to
  take two renames, the previous content, which is put back) is dealt with when the next run
  for the same ``--out`` starts.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path

from qublast.errors import InputError
from qublast.files import pid_alive
from runtime.bundle import BUNDLE_FORMAT, MANIFEST, device_built, manifest_names

_STAGING = ".{name}.qublast-{pid}"
_PREVIOUS = ".{name}.qublast-{pid}-previous"


def absolute(path: Path) -> Path:
    """``path`` made absolute with its parent resolved; a link in the last component is kept as a link."""
    path = Path(path).expanduser()
    return Path(os.path.abspath(path)).parent.resolve() / Path(os.path.abspath(path)).name


def check_out(out: Path, *, overwrite: bool, inputs: dict[str, str | Path | None]) -> Path:
    """Refuse an ``--out`` that would lose a file (``InputError``); returns its absolute path.

    ``inputs``: the local paths the run reads or keeps (``{"model": path, "cache": path, ...}``),
    existing or not; None entries are skipped."""
    out = absolute(out)
    if not out.name or out == Path(out.anchor):
        raise InputError(f"--out {out} is a file system root; name a folder for the bundle")
    cwd = Path.cwd().resolve()
    if within(cwd, out):
        raise InputError(f"--out {out} {'is' if cwd == out else 'holds'} the current directory; name a folder for the bundle")
    home = Path.home().resolve()
    if within(home, out):
        raise InputError(f"--out {out} {'is' if home == out else 'holds'} your home folder; name a folder for the bundle")
    for what, path in inputs.items():
        if path is None:
            continue
        names = {absolute(Path(path)), Path(path).expanduser().resolve()}  # as given, and links followed
        if any(within(p, out) for p in names):
            raise InputError(f"--out {out} {'is' if out in names else 'holds'} the {what} ({path}); "
                             f"write the bundle elsewhere")
        if any(n.is_dir() and within(out, n) for n in names):  # a file of a model folder, or the cache's
            raise InputError(f"--out {out} is inside the {what} ({path}); write the bundle elsewhere")
    reason = occupant(out)
    if reason and not overwrite:
        raise InputError(f"--out {out} {reason}; pass --overwrite to replace it, or name another folder")
    _check_parent(out)
    return out


def occupant(out: Path) -> str | None:
    """Why replacing ``out`` would lose something (None: nothing there, an empty folder, or a bundle)."""
    if out.is_symlink():
        return "is a symbolic link"
    if not out.exists():
        return None
    if not out.is_dir():
        return "is a file, not a bundle folder"
    try:
        if not any(out.iterdir()):
            return None
    except OSError as exc:
        return f"is a folder this process cannot read ({exc.strerror})"
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest_names(manifest) if manifest.get("format") == BUNDLE_FORMAT else None
    except (OSError, ValueError, AttributeError, TypeError):
        listed = None
    if listed is None:
        return f"is a folder that is not a QuBLAST bundle ({_count_files(out)})"
    entries = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    extra = [e for e in entries if e != MANIFEST and e not in listed and not device_built(e)]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"is a bundle holding files its manifest does not list ({shown})"
    return None


def _count_files(folder: Path, limit: int = 1000) -> str:
    """"N files", counting no further than ``limit`` (a home folder is not walked to the end)."""
    count = 0
    for _root, _dirs, files in os.walk(folder):
        count += len(files)
        if count > limit:
            return f"over {limit} files"
    return f"{count} files"


def new_parents(out: Path) -> list[Path]:
    """The folders above ``out`` that do not exist yet, nearest first (``stage`` makes them)."""
    missing = []
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def remove_new_parents(made: list[Path]) -> None:
    """Remove the folders ``new_parents`` listed, when a failed run left them empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there) or gone: leave it
            return


def stage(out: Path) -> Path:
    """A fresh staging folder beside ``out`` (mode 0755), after dealing with earlier runs' leftovers."""
    recover(out)
    path = out.parent / _STAGING.format(name=out.name, pid=os.getpid())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a pid reused after an earlier run was killed
            shutil.rmtree(path)
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    except OSError as exc:
        raise InputError(f"cannot write beside --out {out}: {exc.strerror or exc}") from exc
    return path


def recover(out: Path) -> list[str]:
    """Put back a previous ``--out`` left aside by a killed two-rename swap, and remove staging
    folders of runs that are no longer alive; returns what was done, one line each."""
    done = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.qublast-(\d+)(-previous)?$")
    if not out.parent.is_dir():
        return done
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            if match.group(2) and not out.exists() and not out.is_symlink():
                os.rename(entry, out)
                done.append(f"restored {out} from {entry.name} (a run was killed while replacing it)")
            else:
                remove(entry)
                done.append(f"removed {entry.name} (left by a killed run)")
    return done


def swap_into_place(staged: Path, out: Path) -> None:
    """Move the finished bundle ``staged`` to ``out``; what ``out`` held is removed only afterwards."""
    if not out.exists() and not out.is_symlink():
        os.rename(staged, out)
        return
    if _exchange(staged, out):  # atomic: ``out`` is the old content or the new bundle, never neither
        remove(staged)  # now the old content
        return
    previous = out.parent / _PREVIOUS.format(name=out.name, pid=os.getpid())
    os.rename(out, previous)  # a kill from here to the next rename is undone by ``recover``
    os.rename(staged, out)
    remove(previous)


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_parent(out: Path) -> None:
    """The nearest existing folder above ``out`` is a folder this process may write in."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: no permission to write in {parent}")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
