"""Rotary embeddings as one ONNX Runtime node each (CPU target).

transformers applies rotary position embeddings as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., h:], x[..., :h])``; the export traces that to six nodes per query
and per key (two Slices, Neg, Concat, two Muls and an Add), 360 nodes of a SmolLM2 decode step.
ONNX Runtime computes the same thing in one ``com.microsoft::RotaryEmbedding`` node (CPU kernel
in ``contrib_ops/cpu/bert/rotary_embedding.cc``; docs/ort-sources.md §7), which ONNX Runtime
itself fuses only in its offline transformers optimizer, not in a session.

That node reads ``cos`` / ``sin`` rows from a cache ``[rows, h]`` at ``position_ids [B, S]``.
The graph already computes the angles of its own positions (``[B, S, 2h]``, both halves equal,
as transformers builds them from ``cat(freqs, freqs)``), so the cache here is those rows'
first halves, ``[B * S, h]``, and ``position_ids`` is ``0 .. B*S-1``: no table is stored and
any position works. A pattern is rewritten only when it is exactly the above: ``x`` 4-D
``[B, heads, S, 2h]`` with a static last dimension, the Slices ``[0, h)`` and ``[h, end)`` on
the last axis, and ``cos`` / ``sin`` ``Unsqueeze(C, 1)`` of a ``Cos`` / ``Sin`` of
``Concat(f, f)`` (optionally times a constant, as the attention scaling of some rotary types
multiplies both). Anything else is left as exported.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def fuse_rotary(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Rewrite every matching rotate-half rotary (module docstring); returns the graph and how many."""
    tables: dict[tuple[str, str], tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    fused = 0
    for neg in [n for n in graph.nodes if n.op == "Neg"]:
        match = _match(neg)
        if match is None:
            continue
        x, half, cos, sin, add = match
        key = (cos.name, sin.name)
        if key not in tables:
            tables[key] = _rows(graph, cos, sin, half)
        positions, cos_rows, sin_rows = tables[key]
        out = add.outputs[0]
        add.outputs.clear()
        graph.nodes.append(gs.Node("RotaryEmbedding", name=f"{out.name}.rotary", domain="com.microsoft",
                                   attrs={"interleaved": 0}, inputs=[x, positions, cos_rows, sin_rows], outputs=[out]))
        fused += 1
    return graph.cleanup().toposort(), fused


def _match(neg: gs.Node):
    """(x, h, cos [B, S, 2h], sin [B, S, 2h], the Add) when ``neg`` is the Neg of a rotate-half rotary, else None."""
    upper = _producer(neg.inputs[0], "Slice")
    cat = _sole_user(neg.outputs[0], "Concat")
    if upper is None or cat is None or _attr(cat, "axis") not in (-1, 3) or len(cat.inputs) != 2 or cat.inputs[0] is not neg.outputs[0]:
        return None
    lower = _producer(cat.inputs[1], "Slice")
    x = upper.inputs[0]
    if lower is None or lower.inputs[0] is not x or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
        return None
    half = x.shape[3] // 2
    high = _slice(upper)
    if x.shape[3] != 2 * half or _slice(lower) != (0, half) or high is None or high[0] != half or high[1] < 2 * half:
        return None
    rot_mul = _sole_user(cat.outputs[0], "Mul")
    add = _sole_user(rot_mul.outputs[0], "Add") if rot_mul is not None else None
    if add is None:
        return None
    x_mul = _producer(_other(add, rot_mul.outputs[0]), "Mul")
    if x_mul is None or x not in x_mul.inputs:
        return None
    sin = _unsqueezed_angle(_other(rot_mul, cat.outputs[0]), "Sin")
    cos = _unsqueezed_angle(_other(x_mul, x), "Cos")
    if sin is None or cos is None:
        return None
    return x, half, cos, sin, add


def _unsqueezed_angle(tensor, trig: str):
    """C when ``tensor`` is ``Unsqueeze(C, [1])`` and C is ``trig(Concat(f, f))`` [times a constant], else None."""
    unsqueeze = _producer(tensor, "Unsqueeze")
    if unsqueeze is None or not _const_is(unsqueeze.inputs[1], [1]):
        return None
    table = unsqueeze.inputs[0]
    node = _producer(table, "Mul")
    if node is not None:  # attention scaling: a constant times the cos / sin
        consts = [t for t in node.inputs if isinstance(t, gs.Constant) and t.values.size == 1]
        if len(consts) != 1:
            return None
        node = _producer(_other(node, consts[0]), trig)
    else:
        node = _producer(table, trig)
    cat = _producer(node.inputs[0], "Concat") if node is not None else None
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] or _attr(cat, "axis") not in (-1, 2):
        return None
    return table


def _rows(graph: gs.Graph, cos: gs.Variable, sin: gs.Variable, half: int):
    """(position_ids [B, S] = 0..B*S-1, cos rows [B*S, h], sin rows [B*S, h]) from ``cos`` / ``sin`` [B, S, 2h]."""
    def const(name, values):
        return gs.Constant(f"{cos.name}.rotary.{name}", np.array(values, dtype=np.int64))

    def var(name, dtype=np.int64):
        return gs.Variable(f"{cos.name}.rotary.{name}", dtype=dtype)

    def node(op, inputs, output, **attrs):
        graph.nodes.append(gs.Node(op, name=f"{output.name}.node", inputs=inputs, outputs=[output], attrs=attrs))
        return output

    shape = node("Shape", [cos], var("shape"), end=2)  # [B, S]
    count = node("ReduceProd", [shape], var("count"), keepdims=0)
    flat = node("Range", [const("zero", 0), count, const("one", 1)], var("flat"))
    positions = node("Reshape", [flat, shape], var("position_ids"))
    rows = []
    for table in (cos, sin):
        first = node("Slice", [table, const(f"{table.name}.start", [0]), const(f"{table.name}.half", [half]),
                               const(f"{table.name}.axis", [-1])], var(f"{table.name}.first_half", table.dtype))
        rows.append(node("Reshape", [first, const(f"{table.name}.rows_shape", [-1, half])], var(f"{table.name}.rows", table.dtype)))
    return positions, rows[0], rows[1]


def _producer(tensor, op: str):
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1 or tensor.inputs[0].op != op:
        return None
    return tensor.inputs[0]


def _sole_user(tensor, op: str):
    users = list(tensor.outputs)
    return users[0] if len(users) == 1 and users[0].op == op else None


def _other(node: gs.Node, tensor):
    """The input of a two-input node that is not ``tensor``."""
    if len(node.inputs) != 2:
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0] if node.inputs[1] is tensor else None


def _attr(node: gs.Node, name: str):
    return node.attrs.get(name)


def _const_is(tensor, values) -> bool:
    return isinstance(tensor, gs.Constant) and tensor.values.reshape(-1).tolist() == list(values)


def _slice(node: gs.Node) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last axis of a 4-D tensor with step 1, else None."""
    if len(node.inputs) < 4 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return None
    starts, ends, axes = (t.values.reshape(-1).tolist() for t in node.inputs[1:4])
    steps = node.inputs[4].values.reshape(-1).tolist() if len(node.inputs) > 4 else [1]
    if len(starts) != 1 or axes[0] not in (-1, 3) or steps != [1]:
        return None
    return starts[0], ends[0]
