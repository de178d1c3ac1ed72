"""runtime/ must run on a Jetson without torch: importing it pulls in no torch, transformers, qublast or export."""
from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_no_torch():
    code = (
        "import sys, runtime.io_spec, runtime.session, runtime.perplexity, runtime.bundle, runtime.generate, runtime.trt_session, "
        "runtime.embedding, runtime.targets\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'qublast', 'export') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_target_table_imports_nothing():
    """runtime/targets.py is the one table calibration, export and runtime share: it imports no third-party module."""
    code = (
        "import sys; before = set(sys.modules); import runtime.targets\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new & {'numpy', 'torch', 'onnx', 'onnxruntime', 'tokenizers', 'safetensors', 'qublast', 'export'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
