"""Run ``qublast.export`` with a fault injected, for the fault tests (a subprocess each).

    python -m tests.faults kill MODULE:FUNCTION N -- EXPORT ARGS...   SIGKILL on the Nth call
    python -m tests.faults term MODULE:FUNCTION N -- EXPORT ARGS...   SIGTERM on the Nth call
    python -m tests.faults fsize BYTES -- EXPORT ARGS...              no file may grow past BYTES

``kill`` replaces the function in its module, so the point is reached exactly as in a real run
and the process dies there as it would under the OOM killer or a power cut; ``fsize`` sets
RLIMIT_FSIZE, so a write past it fails with EFBIG as a full disk fails with ENOSPC.
"""
from __future__ import annotations

import functools
import importlib
import os
import resource
import signal
import sys


def _kill_at(target: str, nth: int, signum: int = signal.SIGKILL) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= nth:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    fault, args = argv[:split], argv[split + 1:]
    if fault[0] in ("kill", "term"):
        _kill_at(fault[1], int(fault[2]), signal.SIGKILL if fault[0] == "kill" else signal.SIGTERM)
    elif fault[0] == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fault[1]), int(fault[1])))
    else:
        raise SystemExit(f"unknown fault {fault[0]!r}")
    from qublast.export import main as export_main

    return export_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
