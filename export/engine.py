"""TensorRT engine build inputs: optimisation profiles and the on-device build script.

Engines are tied to the GPU and the TensorRT version, so the bundle carries a script that
builds ``model.plan`` on the Jetson itself with ``trtexec --stronglyTyped`` (precision comes
from the graph's Q/DQ nodes; ``--fp16/--int8/--best`` are incompatible with it). The build
needs about 3-4x the ONNX model's size in host memory.
"""
from __future__ import annotations

from runtime import io_spec


def profiles(*, num_layers: int, kv_heads: int, head_dim: int, context: int, opt_seq: int = 128) -> dict[str, tuple[str, str, str]]:
    """``{input: (min, opt, max)}`` shapes as trtexec writes them ("1x128"), batch 1."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    opt_seq = min(opt_seq, context)
    out = {
        io_spec.INPUT_IDS: ("1x1", f"1x{opt_seq}", f"1x{context}"),
        io_spec.POSITION_IDS: ("1x1", f"1x{opt_seq}", f"1x{context}"),
        io_spec.ATTENTION_MASK: ("1x1", f"1x{context // 2}", f"1x{context}"),
    }
    past = (f"1x{kv_heads}x0x{head_dim}", f"1x{kv_heads}x{context // 2}x{head_dim}", f"1x{kv_heads}x{context - 1}x{head_dim}")
    for i in range(num_layers):
        for kind in io_spec.KV_KINDS:
            out[io_spec.past_name(i, kind)] = past
    return out


def build_script(shapes: dict[str, tuple[str, str, str]], *, onnx_name: str = "model.onnx", plan_name: str = "model.plan") -> str:
    """A bash script that builds the engine next to itself with trtexec."""
    def flag(index: int) -> str:
        return ",".join(f"{name}:{dims[index]}" for name, dims in shapes.items())

    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for this bundle ON THE TARGET (engines are tied to GPU + TensorRT version).
# Needs TensorRT >= 10.3 (JetPack 6.2) for INT4 block DequantizeLinear, and about 3-4x the
# ONNX model's size in host memory. Precision comes from the graph's Q/DQ nodes (strongly typed).
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC=${{TRTEXEC:-trtexec}}
"$TRTEXEC" --onnx={onnx_name} --stronglyTyped --saveEngine={plan_name}.tmp \\
  --minShapes={flag(0)} \\
  --optShapes={flag(1)} \\
  --maxShapes={flag(2)} \\
  "$@"
mv {plan_name}.tmp {plan_name}
echo "engine written: $(pwd)/{plan_name}"
"""
