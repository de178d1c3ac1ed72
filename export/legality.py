"""TensorRT legality of a Jetson graph (explicit quantization, strongly typed build, fp16).

Each rule and its source is listed in docs/targets.md:

- default-domain opset 21; only standard-domain ops, each one TensorRT's ONNX parser supports
  (``TRT_OPS``, from onnx-tensorrt's operator table);
- every zero point absent or zero (symmetric);
- weight DequantizeLinear reads a constant INT8 or INT4 initializer with constant scales:
  INT8 per tensor or per channel (no blocks), INT4 only 2-D, blocked with ``block_size`` 64
  or 128 along an even dimension, an even last dimension, and weight-only (feeding MatMul/Gemm);
- activation quantization is INT8 with one scalar constant scale (per tensor), never INT4;
- fp16 graph (a strongly typed engine keeps the graph's types): DequantizeLinear scales are
  fp16 (its output type is its scale's); the weights of MatMul/Gemm/Conv/Gather are fp16 or
  quantized, and those ops compute in fp16; fp32 appears only in ``FP32_OPS`` (RMSNorm's
  reduction, rotary tables, softmax and its mask, the SSM state update, the logits cast), and
  the logits output is fp32. fp32 constants that feed only those islands (rotary frequencies,
  an SSM's A, D and dt bias) are allowed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qublast.errors import GraphError

REQUIRED_OPSET = 21
# Every op a Jetson graph may use: supported in onnx-tensorrt's operator table (docs/operators.md,
# onnx/onnx-tensorrt@96e7811, branch 10.1-GA, the closest to TensorRT 10.3; every entry "Y" there, checked).
TRT_OPS = frozenset({
    "Add", "And", "Cast", "Concat", "ConstantOfShape", "Conv", "Cos", "CumSum", "DequantizeLinear", "Div", "Equal", "Erf",
    "Exp", "Expand", "Gather", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "Identity", "IsNaN", "Less", "LessOrEqual",
    "MatMul", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceMean",
    "ReduceSum", "Reshape", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub",
    "Tanh", "Transpose", "Trilu", "Unsqueeze", "Where",
})
INT4_BLOCK_SIZES = (64, 128)
_INT8, _INT4 = onnx.TensorProto.INT8, onnx.TensorProto.INT4
_FP32, _FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
# Ops that may output fp32 in an fp16 graph, and why (docs/targets.md):
FP32_OPS = {
    "Cast": "into and out of the fp32 islands below; logits to fp32",
    "Pow": "RMSNorm: mean of squares in fp32 (x^2 overflows fp16 for |x| > 256)",
    "ReduceMean": "RMSNorm's reduction",
    "Add": "RMSNorm's + eps; the attention mask added to fp32 scores",
    "Sqrt": "RMSNorm", "Reciprocal": "RMSNorm", "Div": "RMSNorm",
    "Mul": "RMSNorm's normalisation; rotary angles (positions x inverse frequencies)",
    "Cos": "rotary tables (positions beyond 2048 are not exact in fp16)", "Sin": "rotary tables",
    "Concat": "rotary tables", "Where": "masking fp32 attention scores", "Softmax": "attention probabilities in fp32",
    "Reshape": "moving fp32 scores", "Unsqueeze": "moving fp32 tables", "Transpose": "moving fp32 tables",
    "Expand": "broadcasting fp32 tables",
    "Exp": "SSM discretisation exp(A dt): transformers keeps the SSM state fp32 in half-precision models",
    "Neg": "Mamba's A = -exp(A_log) in fp32 (constant-folded in small graphs, kept at realistic sizes)",
    "Sigmoid": "Mamba2's gated RMSNorm: silu(gate) in fp32 before the fp32 normalisation",
}
_COMPUTE = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def violations(model: onnx.ModelProto, *, graph_dtype: str = "float16") -> list[str]:
    """Every rule the graph breaks, one line each (empty: legal); ``graph_dtype`` "float16" adds
    the fp16-graph rules."""
    found = _qdq_violations(model)
    if graph_dtype == "float16":
        found += fp16_violations(model)
    return found


def _qdq_violations(model: onnx.ModelProto) -> list[str]:
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
        elif node.op_type not in TRT_OPS:
            found.append(f"{node.name}: {node.op_type} is not in the TensorRT ONNX parser's operator table (export.legality.TRT_OPS)")
        if node.op_type == "QuantizeLinear":
            found += _check_q(node, inits)
        elif node.op_type == "DequantizeLinear":
            found += _check_dq(node, inits, consumers)
    return found


def fp16_violations(model: onnx.ModelProto) -> list[str]:
    """fp16-graph rules: fp16 weights and scales, fp16 matmuls, fp32 only in ``FP32_OPS``, fp32 logits."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    weight_ops = set(_COMPUTE) | {"Gather"}
    found = [f"initializer {t.name} {list(t.dims)} is fp32: weights of an fp16 graph are fp16 or quantized"
             for t in graph.initializer if t.data_type == _FP32 and weight_ops & set(users.get(t.name, ()))]
    for node in graph.node:
        outs = [types.get(o) for o in node.output]
        if node.op_type in _COMPUTE and _FP32 in [types.get(i) for i in node.input] + outs:
            found.append(f"{node.name}: {node.op_type} computes in fp32 (an fp16 graph's matmuls run in fp16)")
        elif node.op_type == "DequantizeLinear" and types.get(node.input[1]) != _FP16:
            found.append(f"{node.name}: DequantizeLinear scale is not fp16 (its output type is its scale's)")
        elif _FP32 in outs and node.op_type not in FP32_OPS:
            found.append(f"{node.name}: {node.op_type} outputs fp32, outside the fp32 islands an fp16 graph allows")
    logits = [o for o in graph.output if o.name == "logits"]
    if logits and logits[0].type.tensor_type.elem_type != _FP32:
        found.append("logits output is not fp32")
    return found


def check_trt_legal(model: onnx.ModelProto, *, graph_dtype: str = "float16") -> None:
    """Raise ``GraphError`` naming the first violations; return quietly for a legal graph."""
    found = violations(model, graph_dtype=graph_dtype)
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
        elif block not in INT4_BLOCK_SIZES:
            found.append(f"{node.name}: INT4 block size {block} is not one TensorRT supports {INT4_BLOCK_SIZES}")
        elif codes.dims[axis] % 2 or codes.dims[axis] % block:
            found.append(f"{node.name}: INT4 blocked dimension {codes.dims[axis]} is odd or not a multiple of {block}")
        elif codes.dims[-1] % 2:
            found.append(f"{node.name}: INT4 weight's last dimension {codes.dims[-1]} is odd (TensorRT's parser refuses it)")
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            found.append(f"{node.name}: INT4 weight must feed MatMul/Gemm only (weight-only)")
    return found


def _attr(node, name):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None
