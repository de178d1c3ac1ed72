"""TensorRT engine build inputs: optimisation profiles and the on-device build script.

Engines are tied to the GPU and the TensorRT version, so the bundle carries a script that
builds ``model.plan`` on the Jetson itself with ``trtexec --stronglyTyped`` (precision comes
from the graph's Q/DQ nodes; ``--fp16/--int8/--best`` are incompatible with it). The build
needs about 3-4x the ONNX model's size in host memory. Export writes the script and
``engine_profiles.json`` from these shapes; ``runtime.build_engine`` builds from the same shapes
with TensorRT's Python API, on the device, with the runtime alone.
"""
from __future__ import annotations

from . import io_spec


def profiles(layout: io_spec.Layout, *, context: int, hidden: int | None = None) -> dict[str, tuple[str, str, str]]:
    """``{input: (min, opt, max)}`` shapes as trtexec writes them ("1x128"), batch 1.

    Each of min, opt and max is itself a consistent shape set (mask = past + seq): min is a
    first token, opt one decode step at half the context (where generation spends its time),
    max a ``context``-token prefill after a ``context - 1`` cache. A step-only graph (state-space
    and hybrid families) takes one token at every point; its recurrent states have fixed shapes.
    ``hidden``: the graph takes ``inputs_embeds`` [1, seq, hidden] instead of ``input_ids``.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    seq = (1, 1, 1) if layout.step_only else (1, 1, context)
    past = (0, context // 2, context - 1)
    out = {io_spec.INPUTS_EMBEDS: tuple(f"1x{s}x{hidden}" for s in seq)} if hidden else {io_spec.INPUT_IDS: tuple(f"1x{s}" for s in seq)}
    if io_spec.has_attention(layout.family):
        out[io_spec.ATTENTION_MASK] = tuple(f"1x{p + s}" for p, s in zip(past, seq))
        out[io_spec.POSITION_IDS] = tuple(f"1x{s}" for s in seq)
    for name in layout.past_names():
        if name in layout.recurrent:
            fixed = "x".join(str(d) for d in (1, *layout.recurrent[name]))
            out[name] = (fixed, fixed, fixed)
        else:
            out[name] = tuple(f"1x{layout.kv_heads}x{p}x{layout.head_dim}" for p in past)
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
