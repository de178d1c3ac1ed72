"""runtime/ must run on a Jetson without torch: importing it pulls in no torch, transformers, qublast or export."""
from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_no_torch():
    code = (
        "import sys, runtime.io_spec, runtime.session, runtime.perplexity, runtime.bundle, runtime.generate, runtime.trt_session\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'qublast', 'export') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
