"""Graph passes on hand-built graphs: each result passes onnx.checker and runs in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto, helper, numpy_helper

from export import qdq
from export.legality import violations
from qublast.quant import quantize_weight

V, H = 40, 32


def _tied_graph(table: np.ndarray) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(table.T as its own constant) -> logits."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "head_w"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, V])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "head_w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """Run with the session options QuBLAST measures with (runtime.session)."""
    import onnxruntime as ort

    from runtime.session import ACCURACY_LEVEL

    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", ACCURACY_LEVEL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_share_tied_table_stores_the_table_once():
    table = np.random.default_rng(0).standard_normal((V, H)).astype(np.float32)
    model = _tied_graph(table)
    ids = {"ids": np.array([[1, 5, 9, 2, 39]], np.int64)}
    before = _run(model, ids)
    graph = qdq.share_tied_table(gs.import_onnx(model), lm_head_node="head")
    after_model = gs.export_onnx(graph)
    assert [i.name for i in after_model.graph.initializer] == ["table"]
    np.testing.assert_array_equal(_run(after_model, ids), before)


def test_quantize_weights_pass_int8_and_int4():
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal((H, H)).astype(np.float32) for _ in range(2))  # [out, in]
    nodes = [helper.make_node("MatMul", ["x", "w1_t"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2_t"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, H])],
        [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1_t"), numpy_helper.from_array(np.ascontiguousarray(w2.T), "w2_t")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q1 = quantize_weight(torch.from_numpy(w1), bits=8, block_size=H)
    q2 = quantize_weight(torch.from_numpy(w2), bits=4, block_size=16)
    linears = {"a": {"bits": 8, "block_size": H}, "b": {"bits": 4, "block_size": 16}}
    out = gs.export_onnx(qdq.quantize_weights(gs.import_onnx(model), linears, {"a": q1.scale, "b": q2.scale}, {"mm1": "a", "mm2": "b"}))
    assert violations(out) == []
    types = {i.name: i.data_type for i in out.graph.initializer}
    assert types["a.qweight"] == TensorProto.INT8 and types["b.qweight"] == TensorProto.INT4
    x = rng.standard_normal((3, H)).astype(np.float32)
    expected = x @ q1.dequantize().numpy().T @ q2.dequantize().numpy().T
    np.testing.assert_allclose(_run(out, {"x": x}), expected, rtol=1e-5, atol=1e-5)


def test_quantize_weights_refuses_unknown_linear():
    import pytest

    from qublast.errors import GraphError

    model = _tied_graph(np.zeros((V, H), np.float32))
    with pytest.raises(GraphError, match="no MatMul"):
        qdq.quantize_weights(gs.import_onnx(model), {"missing": {"bits": 8, "block_size": H}}, {}, {"head": "lm_head"})
