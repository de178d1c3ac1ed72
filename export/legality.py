"""TensorRT legality of a QDQ graph (explicit quantization, strongly typed build).

Rules (REFERENCES.md): default-domain opset 21; only standard-domain ops; every zero point
absent or zero (symmetric); weight DequantizeLinear reads a constant INT8 or INT4 initializer
with constant scales: INT8 per tensor or per channel, INT4 only 2-D, blocked (``block_size``,
even blocked dimension) and weight-only (feeding MatMul/Gemm); activation quantization is
INT8 with one scalar constant scale (per tensor), never INT4.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qublast.errors import GraphError

REQUIRED_OPSET = 21
_INT8, _INT4 = onnx.TensorProto.INT8, onnx.TensorProto.INT4


def violations(model: onnx.ModelProto) -> list[str]:
    """Every rule the graph breaks, one line each (empty: legal)."""
    graph = model.graph
    found = []
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != REQUIRED_OPSET:
        found.append(f"default-domain opset is {opsets.get('')}, TensorRT INT4 needs {REQUIRED_OPSET}")
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            found.append(f"{node.name}: {node.domain}::{node.op_type} is not a standard op")
        if node.op_type == "QuantizeLinear":
            found += _check_q(node, inits)
        elif node.op_type == "DequantizeLinear":
            found += _check_dq(node, inits, consumers)
    return found


def check_trt_legal(model: onnx.ModelProto) -> None:
    """Raise ``GraphError`` naming the first violations; return quietly for a legal graph."""
    found = violations(model)
    if found:
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        raise GraphError("graph is not TensorRT-legal: " + "; ".join(found[:3]) + more)


def _check_zero_point(node, inits) -> list[str]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    zp = inits.get(node.input[2])
    if zp is None:
        return [f"{node.name}: zero point is not a constant"]
    if np.any(numpy_helper.to_array(zp) != 0):
        return [f"{node.name}: zero point is not 0 (asymmetric)"]
    return []


def _check_q(node, inits) -> list[str]:
    found = _check_zero_point(node, inits)
    scale = inits.get(node.input[1])
    if scale is None:
        found.append(f"{node.name}: activation scale is not a constant")
    elif int(np.prod(scale.dims)) != 1:
        found.append(f"{node.name}: activation scale is not per tensor (shape {list(scale.dims)})")
    out_type = _attr(node, "output_dtype") or onnx.TensorProto.UINT8  # ONNX default without zero point
    if len(node.input) >= 3 and node.input[2] in inits:
        out_type = inits[node.input[2]].data_type
    if out_type != _INT8:
        found.append(f"{node.name}: activations may only be quantized to INT8 (got {onnx.TensorProto.DataType.Name(out_type)})")
    return found


def _check_dq(node, inits, consumers) -> list[str]:
    found = _check_zero_point(node, inits)
    if node.input[1] not in inits:
        found.append(f"{node.name}: scale is not a constant")
    codes = inits.get(node.input[0])
    if codes is None:
        return found  # activation DQ: its QuantizeLinear was checked
    if codes.data_type not in (_INT8, _INT4):
        found.append(f"{node.name}: weight type {onnx.TensorProto.DataType.Name(codes.data_type)} is not INT8/INT4")
    if codes.data_type == _INT8 and _attr(node, "block_size"):
        found.append(f"{node.name}: INT8 weights take per-tensor or per-channel scales, not blocks")
    if codes.data_type == _INT4:
        block, axis = _attr(node, "block_size"), _attr(node, "axis") or 0
        if len(codes.dims) != 2:
            found.append(f"{node.name}: INT4 weight is {len(codes.dims)}-D, TensorRT needs 2-D")
        elif not block:
            found.append(f"{node.name}: INT4 weight without block_size")
        elif codes.dims[axis] % 2 or codes.dims[axis] % block:
            found.append(f"{node.name}: INT4 blocked dimension {codes.dims[axis]} is odd or not a multiple of {block}")
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            found.append(f"{node.name}: INT4 weight must feed MatMul/Gemm only (weight-only)")
    return found


def _attr(node, name):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None
