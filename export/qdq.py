"""QDQ injection: small named onnx-graphsurgeon passes that write a recipe into the graph.

Each pass takes a ``gs.Graph`` and ends with ``cleanup().toposort()``:

- ``share_tied_table``: the lm_head MatMul reads ``Transpose(embedding table)`` instead of a
  second, pre-transposed copy the exporter made for tied weights.
- ``quantize_weights``: for each quantized linear, its ``[in, out]`` weight constant becomes
  ``DequantizeLinear(q, scale)``: INT8 per output channel (axis 1) or INT4 blocks along the
  input (axis 0, ``block_size``), zero point 0, codes recomputed from the checkpoint's weight
  and the recipe's scales. INT4 codes are packed two per byte, low nibble first.
- ``quantize_activations``: for each ``w8a8`` linear, its MatMul's input passes through its
  own QuantizeLinear -> DequantizeLinear pair (INT8, per-tensor scale, zero point 0). One pair
  per consuming MatMul: a pair shared by q/k/v stops ONNX Runtime's fusion.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
import torch

from qublast.errors import GraphError
from qublast.quant import quantize_with_scale


def share_tied_table(graph: gs.Graph, *, lm_head_node: str) -> gs.Graph:
    """Point the lm_head MatMul at ``Transpose(table)`` when its weight is the embedding transposed."""
    gathers = [n for n in graph.nodes if n.op == "Gather" and isinstance(n.inputs[0], gs.Constant)]
    head = _node(graph, lm_head_node)
    weight = head.inputs[1]
    for gather in gathers:
        table = gather.inputs[0]
        if isinstance(weight, gs.Constant) and weight.shape == table.shape[::-1] and np.array_equal(weight.values, table.values.T):
            transposed = gs.Variable(f"{table.name}_T", dtype=table.dtype, shape=list(weight.shape))
            graph.nodes.append(gs.Node("Transpose", name=f"{head.name}_tied_T", attrs={"perm": [1, 0]}, inputs=[table], outputs=[transposed]))
            head.inputs[1] = transposed
            break
    return graph.cleanup().toposort()


def quantize_weights(graph: gs.Graph, linears: dict[str, dict], scales: dict[str, torch.Tensor], node_modules: dict[str, str]) -> gs.Graph:
    """Replace each quantized linear's weight constant with a DequantizeLinear (see module doc)."""
    nodes = _matmuls(graph, linears, node_modules, what="quantized linear")
    for module, entry in linears.items():
        node = nodes[module]
        w = torch.from_numpy(_weight_out_in(node, module))  # [out, in]
        q = quantize_with_scale(w, scales[module], bits=entry["bits"], block_size=entry["block_size"]).numpy()
        scale = scales[module].numpy().astype(np.float32)  # [out, G]
        node.inputs[1] = _dequantize(graph, module, q.T, scale, bits=entry["bits"], block_size=entry["block_size"])
    return graph.cleanup().toposort()


def quantize_activations(graph: gs.Graph, act_scales: dict[str, float], node_modules: dict[str, str]) -> gs.Graph:
    """Insert a Q/DQ pair in front of the activation input of each named linear's MatMul."""
    nodes = _matmuls(graph, act_scales, node_modules, what="w8a8 linear")
    for module, scale in act_scales.items():
        node = nodes[module]
        x = node.inputs[0]
        scale_c = gs.Constant(f"{module}.act_scale", np.array(scale, dtype=np.float32))
        zero = gs.Constant(f"{module}.act_zero", np.array(0, dtype=np.int8))
        q = gs.Variable(f"{module}.act_q", dtype=np.int8, shape=x.shape)
        dq = gs.Variable(f"{module}.act_dq", dtype=np.float32, shape=x.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{module}.act_quant", inputs=[x, scale_c, zero], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{module}.act_dequant", inputs=[q, scale_c, zero], outputs=[dq]))
        node.inputs[0] = dq
    return graph.cleanup().toposort()


def _weight_out_in(node: gs.Node, module: str) -> np.ndarray:
    """The MatMul's weight as [out, in]: a constant [in, out], or Transpose of a constant [out, in]."""
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant) and len(weight.shape) == 2:
        return np.ascontiguousarray(weight.values.T)
    producer = weight.inputs[0] if weight.inputs else None
    if (
        producer is not None and producer.op == "Transpose" and producer.attrs.get("perm") == [1, 0]
        and isinstance(producer.inputs[0], gs.Constant)
    ):
        return np.ascontiguousarray(producer.inputs[0].values)
    raise GraphError(f"{module}: MatMul weight is not a 2-D constant")


def _dequantize(graph: gs.Graph, module: str, q_t: np.ndarray, scale: np.ndarray, *, bits: int, block_size: int) -> gs.Variable:
    """DequantizeLinear node for codes ``q_t`` [in, out] and scales [out, G]; returns its output."""
    in_f, out_f = q_t.shape
    if bits == 8 and block_size == in_f:
        codes = gs.Constant(f"{module}.qweight", np.ascontiguousarray(q_t.astype(np.int8)))
        scale_c = gs.Constant(f"{module}.scale", np.ascontiguousarray(scale[:, 0]))  # [out]
        attrs = {"axis": 1}
    elif bits == 4:
        codes = gs.Constant(f"{module}.qweight", LazyValues(pack_int4(f"{module}.qweight", q_t)))
        scale_c = gs.Constant(f"{module}.scale", np.ascontiguousarray(scale.T))  # [G, out]
        attrs = {"axis": 0, "block_size": block_size}
    else:
        raise GraphError(f"{module}: no DequantizeLinear layout for {bits}-bit weights with block {block_size}")
    out = gs.Variable(f"{module}.weight_dq", dtype=np.float32, shape=[in_f, out_f])
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{module}.dq", attrs=attrs, inputs=[codes, scale_c], outputs=[out]))
    return out


def pack_int4(name: str, q: np.ndarray) -> onnx.TensorProto:
    """INT4 TensorProto of ``q`` (values in [-8, 7]): two per byte, element 2k in the low nibble."""
    if q.size and (q.min() < -8 or q.max() > 7):
        raise GraphError(f"{name}: INT4 codes out of range")
    flat = q.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.INT4
    tensor.dims.extend(q.shape)
    tensor.raw_data = packed.tobytes()
    return tensor


def _matmuls(graph: gs.Graph, modules, node_modules: dict[str, str], *, what: str) -> dict[str, gs.Node]:
    """``{module: its MatMul node}``; every module must have one (nothing is silently skipped)."""
    by_module = {module: name for name, module in node_modules.items()}
    missing = sorted(set(modules) - set(by_module))
    if missing:
        raise GraphError(f"graph has no MatMul for {what}(s): {', '.join(missing[:3])}")
    return {module: _node(graph, by_module[module]) for module in modules}


def _node(graph: gs.Graph, name: str) -> gs.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise GraphError(f"graph has no node {name!r}")
