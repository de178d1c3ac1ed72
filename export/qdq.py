"""QDQ injection: small named onnx-graphsurgeon passes that write a recipe into the graph.

Each pass takes a ``gs.Graph`` and ends with ``cleanup().toposort()``:

- ``share_tied_table``: the lm_head MatMul reads ``Transpose(embedding table)`` instead of a
  second, pre-transposed copy the exporter made for tied weights.
- ``quantize_weights``: for each quantized linear, its ``[in, out]`` weight constant becomes
  ``DequantizeLinear(q, scale)``: INT8 per output channel (axis 1), or INT8 / INT4 blocks
  along the input (axis 0, ``block_size``), zero point 0, codes recomputed from the fp32
  weight (after the map's folds) and the recipe's scales. Scales are stored in the graph's
  float type, so the DequantizeLinear outputs it (TensorRT and ONNX take the output type from
  the scale). INT4 codes are packed two per byte, low nibble first.
- ``quantize_activations``: for each ``w8a8`` linear, its MatMul's input passes through its
  own QuantizeLinear -> DequantizeLinear pair (INT8, per-tensor scale, zero point 0). One pair
  per consuming MatMul: a pair shared by q/k/v stops ONNX Runtime's fusion.
- ``gather_from_head_codes`` (CPU target, a tied table quantized like lm_head): lm_head becomes
  ONNX Runtime's ``MatMulNBits`` over its codes and the token lookup a ``GatherBlockQuantized``
  of the same codes, so the table is stored once (docs/targets.md §5).
- ``fusable_rms_norms``: ``x * Reciprocal(Sqrt(.))`` becomes ``x / Sqrt(.)``, the form ONNX
  Runtime fuses into SimplifiedLayerNormalization (CPU target; docs/ort-sources.md).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues

from qublast.errors import GraphError
from qublast.quant import quantize_with_scale
from runtime.embedding import pack_int4_rows


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


def quantize_weights(graph: gs.Graph, linears: dict[str, dict], scales: dict[str, torch.Tensor], node_modules: dict[str, str],
                     *, weights: dict[str, torch.Tensor] | None = None, codes: dict[str, torch.Tensor] | None = None,
                     float_dtype=np.float32) -> gs.Graph:
    """Replace each quantized linear's weight constant with a DequantizeLinear (see module doc).
    ``codes`` gives each linear's int8 codes [out, in] (GPTQ, or recomputed by the caller);
    otherwise they are ``clamp(round(w / scale))`` of its fp32 weight [out, in] in ``weights``."""
    nodes = _matmuls(graph, linears, node_modules, what="quantized linear")
    for module, entry in linears.items():
        node = nodes[module]
        if codes is not None and module in codes:
            q = codes[module].numpy()
        else:
            q = quantize_with_scale(weights[module], scales[module], bits=entry["bits"], block_size=entry["block_size"]).numpy()
        _check_weight(node, module, tuple(q.shape))
        scale = scales[module].numpy().astype(float_dtype)  # [out, G]
        node.inputs[1] = _dequantize(graph, module, q.T, scale, bits=entry["bits"], block_size=entry["block_size"],
                                     per_channel=entry.get("per_channel", False))
    return graph.cleanup().toposort()


def gather_from_head_codes(graph: gs.Graph, *, lm_head_node: str, module: str, q: np.ndarray, scale: np.ndarray,
                           bits: int, block_size: int, accuracy_level: int, float_dtype=np.float32) -> gs.Graph:
    """Store a tied table once, as lm_head's codes ``q`` [V, H] with scales [V, H / block_size].

    After ``share_tied_table`` the lm_head MatMul reads ``Transpose(table)`` and the token lookup
    is ``Gather(table, ids)``. The MatMul becomes ``com.microsoft::MatMulNBits`` over uint8 codes
    [V, blocks, block bytes]: each code plus 2^(bits-1) (the kernel's zero point when none is
    given), 4-bit codes two per byte, low nibble first. The Gather becomes
    ``com.microsoft::GatherBlockQuantized`` of the same codes (uint8 path: gather axis 0, the
    quantized axis last, the same default zero point), scales viewed as [V, blocks, 1], its rows
    [..., blocks, block_size] reshaped to [..., H]. The fp table constant is then unused."""
    head = _node(graph, lm_head_node)
    transpose = head.inputs[1].inputs[0] if head.inputs[1].inputs else None
    if transpose is None or transpose.op != "Transpose" or not isinstance(transpose.inputs[0], gs.Constant):
        raise GraphError(f"{module}: lm_head does not read the tied table (share_tied_table first)")
    table = transpose.inputs[0]
    gathers = [n for n in graph.nodes if n.op == "Gather" and n.inputs[0] is table]
    vocab, width = q.shape
    if len(gathers) != 1 or tuple(table.shape) != (vocab, width) or width % block_size or bits not in (4, 8):
        raise GraphError(f"{module}: cannot gather {bits}-bit rows of block {block_size} from the tied table {table.shape}")
    blocks = width // block_size
    codes = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(vocab, blocks, block_size)
    if bits == 4:  # unsigned nibbles (zero point 8), the same order
        codes = pack_int4_rows(codes.reshape(vocab, width)).reshape(vocab, blocks, block_size // 2)
    codes_c = gs.Constant(f"{module}.qweight", np.ascontiguousarray(codes))
    scale_c = gs.Constant(f"{module}.scale", np.ascontiguousarray(scale.astype(float_dtype)))  # [V, blocks]
    x = head.inputs[0]
    head.op, head.domain = "MatMulNBits", "com.microsoft"
    head.attrs = {"K": width, "N": vocab, "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level}
    head.inputs.clear()
    head.inputs.extend([x, codes_c, scale_c])

    gather = gathers[0]
    ids, rows = gather.inputs[1], gather.outputs[0]
    gather.outputs.clear()

    def var(name, dtype):
        return gs.Variable(f"{module}.table_{name}", dtype=dtype)

    def add(op, inputs, output, **kwargs):
        graph.nodes.append(gs.Node(op, name=f"{output.name}_node", inputs=inputs, outputs=[output], **kwargs))
        return output

    scale3 = add("Reshape", [scale_c, gs.Constant(f"{module}.table_scale_shape", np.array([vocab, blocks, 1], np.int64))],
                 var("scale3", scale_c.dtype))
    blocked = add("GatherBlockQuantized", [codes_c, ids, scale3], var("blocked", scale_c.dtype), domain="com.microsoft",
                  attrs={"gather_axis": 0, "quantize_axis": 2, "block_size": block_size, "bits": bits})
    ids_shape = add("Shape", [ids], var("ids_shape", np.int64))
    shape = add("Concat", [ids_shape, gs.Constant(f"{module}.table_width", np.array([width], np.int64))],
                var("rows_shape", np.int64), attrs={"axis": 0})
    add("Reshape", [blocked, shape], rows)
    return graph.cleanup().toposort()


def quantize_activations(graph: gs.Graph, act_scales: dict[str, float], node_modules: dict[str, str], *, float_dtype=np.float32) -> gs.Graph:
    """Insert a Q/DQ pair in front of the activation input of each named linear's MatMul."""
    nodes = _matmuls(graph, act_scales, node_modules, what="w8a8 linear")
    for module, scale in act_scales.items():
        node = nodes[module]
        x = node.inputs[0]
        scale_c = gs.Constant(f"{module}.act_scale", np.array(scale, dtype=float_dtype))
        zero = gs.Constant(f"{module}.act_zero", np.array(0, dtype=np.int8))
        q = gs.Variable(f"{module}.act_q", dtype=np.int8, shape=x.shape)
        dq = gs.Variable(f"{module}.act_dq", dtype=float_dtype, shape=x.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{module}.act_quant", inputs=[x, scale_c, zero], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{module}.act_dequant", inputs=[q, scale_c, zero], outputs=[dq]))
        node.inputs[0] = dq
    return graph.cleanup().toposort()


def fusable_rms_norms(graph: gs.Graph) -> gs.Graph:
    """Rewrite ``Mul(x, Reciprocal(Sqrt(v)))`` as ``Div(x, Sqrt(v))`` (the same value up to one rounding; ORT fuses the latter)."""
    for node in list(graph.nodes):
        if node.op != "Reciprocal" or not node.inputs[0].inputs or node.inputs[0].inputs[0].op != "Sqrt":
            continue
        users = list(node.outputs[0].outputs)
        if len(users) != 1 or users[0].op != "Mul":
            continue
        mul = users[0]
        x = mul.inputs[0] if mul.inputs[1] is node.outputs[0] else mul.inputs[1]
        sqrt_out = node.inputs[0]
        mul.op = "Div"
        mul.inputs.clear()
        mul.inputs.extend([x, sqrt_out])
    return graph.cleanup().toposort()


def _check_weight(node: gs.Node, module: str, shape: tuple[int, int]) -> None:
    """The MatMul's weight must be the linear's: a constant [in, out], or Transpose of a constant [out, in]."""
    weight = node.inputs[1]
    found = None
    if isinstance(weight, gs.Constant) and len(weight.shape) == 2:
        found = tuple(weight.shape[::-1])
    elif weight.inputs and weight.inputs[0].op == "Transpose" and weight.inputs[0].attrs.get("perm") == [1, 0]:
        source = weight.inputs[0].inputs[0]
        found = tuple(source.shape) if isinstance(source, gs.Constant) else None
    if found is None:
        raise GraphError(f"{module}: MatMul weight is not a 2-D constant")
    if found != shape:
        raise GraphError(f"{module}: graph weight {found} does not match the model's {shape}")


def _dequantize(graph: gs.Graph, module: str, q_t: np.ndarray, scale: np.ndarray, *, bits: int, block_size: int,
                per_channel: bool) -> gs.Variable:
    """DequantizeLinear node for codes ``q_t`` [in, out] and scales [out, G]; returns its output.

    ``per_channel``: INT8 with one scale per output column (axis 1), the layout TensorRT takes;
    else blocks along the input (axis 0), even when one block spans the whole input, so ONNX
    Runtime's MatMulNBits quantizes activations in the blocks calibration emulated."""
    in_f, out_f = q_t.shape
    if bits == 8 and per_channel and block_size == in_f:
        codes = gs.Constant(f"{module}.qweight", np.ascontiguousarray(q_t.astype(np.int8)))
        scale_c = gs.Constant(f"{module}.scale", np.ascontiguousarray(scale[:, 0]))  # [out]
        attrs = {"axis": 1}
    elif bits in (4, 8) and in_f % block_size == 0:
        values = LazyValues(pack_int4(f"{module}.qweight", q_t)) if bits == 4 else np.ascontiguousarray(q_t.astype(np.int8))
        codes = gs.Constant(f"{module}.qweight", values)
        scale_c = gs.Constant(f"{module}.scale", np.ascontiguousarray(scale.T))  # [G, out]
        attrs = {"axis": 0, "block_size": block_size}
    else:
        raise GraphError(f"{module}: no DequantizeLinear layout for {bits}-bit weights with block {block_size}")
    out = gs.Variable(f"{module}.weight_dq", dtype=scale.dtype, shape=[in_f, out_f])
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{module}.dq", attrs=attrs, inputs=[codes, scale_c], outputs=[out]))
    return out


def pack_int4(name: str, q: np.ndarray) -> onnx.TensorProto:
    """INT4 TensorProto of ``q`` (values in [-8, 7]): two per byte, element 2k in the low nibble."""
    if q.size and (q.min() < -8 or q.max() > 7):
        raise GraphError(f"{name}: INT4 codes out of range")
    flat = q.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    packed = pack_int4_rows(flat[None, :])[0]
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
