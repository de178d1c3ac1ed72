"""``python -m export.build_engine``: the engine builder under its old name, for scripts that call it.

The builder is ``runtime/build_engine.py`` (``python -m runtime.build_engine``), so a device with
only the runtime installed runs it; this forwards the command line there unchanged.
"""
from __future__ import annotations

import sys

from runtime.build_engine import main

if __name__ == "__main__":
    sys.exit(main())
