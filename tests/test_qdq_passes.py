"""Graph passes on hand-built graphs: each result passes onnx.checker and runs in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import qdq
from export.legality import violations
from qublast.quant import quantize_weight

V, H = 40, 128


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

    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 math: exact
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


def _two_matmuls(w1: np.ndarray, w2: np.ndarray, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    nodes = [helper.make_node("MatMul", ["x", "w1_t"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2_t"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", dtype, [3, H])], [helper.make_tensor_value_info("y", dtype, [3, H])],
        [numpy_helper.from_array(np.ascontiguousarray(w1.T.astype(np_dtype)), "w1_t"),
         numpy_helper.from_array(np.ascontiguousarray(w2.T.astype(np_dtype)), "w2_t")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("bits1,block1", [(8, H), (8, 32)])  # INT8 per channel (Jetson w8a8) and blocked (CPU w8)
def test_quantize_weights_pass_int8_and_int4(bits1, block1):
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal((H, H)).astype(np.float32) for _ in range(2))  # [out, in]
    q1 = quantize_weight(torch.from_numpy(w1), bits=bits1, block_size=block1)
    q2 = quantize_weight(torch.from_numpy(w2), bits=4, block_size=64)
    linears = {"a": {"bits": bits1, "block_size": block1, "per_channel": block1 == H}, "b": {"bits": 4, "block_size": 64}}
    weights = {"a": torch.from_numpy(w1), "b": torch.from_numpy(w2)}
    out = gs.export_onnx(qdq.quantize_weights(gs.import_onnx(_two_matmuls(w1, w2)), linears, {"a": q1.scale, "b": q2.scale},
                                              {"mm1": "a", "mm2": "b"}, weights=weights))
    if block1 == H:  # TensorRT takes INT8 per channel only
        assert violations(out, graph_dtype="float32") == []
    types = {i.name: i.data_type for i in out.graph.initializer}
    assert types["a.qweight"] == TensorProto.INT8 and types["b.qweight"] == TensorProto.INT4
    x = rng.standard_normal((3, H)).astype(np.float32)
    expected = x @ q1.dequantize().numpy().T @ q2.dequantize().numpy().T  # values ~1e2: fp32 accumulation order
    np.testing.assert_allclose(_run(out, {"x": x}), expected, rtol=1e-5, atol=1e-3)


def test_quantize_weights_in_an_fp16_graph_outputs_fp16():
    """fp16 scales make DequantizeLinear output fp16: the Jetson graph stays fp16 and TensorRT-legal."""
    rng = np.random.default_rng(2)
    w1, w2 = (rng.standard_normal((H, H)).astype(np.float32) for _ in range(2))
    q1 = quantize_weight(torch.from_numpy(w1), bits=8, block_size=H)
    q2 = quantize_weight(torch.from_numpy(w2), bits=4, block_size=64)
    linears = {"a": {"bits": 8, "block_size": H, "per_channel": True}, "b": {"bits": 4, "block_size": 64}}
    model = gs.export_onnx(qdq.quantize_weights(
        gs.import_onnx(_two_matmuls(w1, w2, TensorProto.FLOAT16)), linears, {"a": q1.scale, "b": q2.scale},
        {"mm1": "a", "mm2": "b"}, weights={"a": torch.from_numpy(w1), "b": torch.from_numpy(w2)}, float_dtype=np.float16))
    scales = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith(".scale")}
    assert set(scales.values()) == {TensorProto.FLOAT16}
    fp16_rules = [v for v in violations(model) if "logits" not in v]  # no logits output in this two-MatMul graph
    assert fp16_rules == []
    x = rng.standard_normal((3, H)).astype(np.float32)
    expected = x @ q1.dequantize().numpy().T @ q2.dequantize().numpy().T
    np.testing.assert_allclose(_run(model, {"x": x.astype(np.float16)}).astype(np.float32), expected, rtol=2e-2, atol=0.3)


def test_codes_come_from_the_given_fp32_weights():
    """The pass quantizes the fp32 weights it is given, not the graph's (possibly fp16-rounded) constant."""
    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal((H, H)).astype(np.float32) for _ in range(2))
    q1 = quantize_weight(torch.from_numpy(w1), bits=4, block_size=64)
    graph = gs.import_onnx(_two_matmuls(np.zeros_like(w1), w2))  # the graph's own constant is all zeros
    out = gs.export_onnx(qdq.quantize_weights(graph, {"a": {"bits": 4, "block_size": 64}}, {"a": q1.scale}, {"mm1": "a"},
                                              weights={"a": torch.from_numpy(w1)}))
    codes = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "a.qweight")).astype(np.int8)
    np.testing.assert_array_equal(codes, q1.q.numpy().T)


def test_fusable_rms_norms_keeps_values_and_lets_ort_fuse(tmp_path):
    """x * Reciprocal(Sqrt(mean(x^2) + eps)) * w becomes x / Sqrt(...) * w: same output, and ONNX
    Runtime then fuses it into SimplifiedLayerNormalization."""
    import onnxruntime as ort

    w = np.random.default_rng(4).standard_normal(H).astype(np.float32)
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["ms_eps"]), helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["xn"]),
             helper.make_node("Mul", ["xn", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    rewritten = gs.export_onnx(qdq.fusable_rms_norms(gs.import_onnx(model)))
    assert [n.op_type for n in rewritten.graph.node].count("Div") == 1
    x = np.random.default_rng(5).standard_normal((2, 3, H)).astype(np.float32) * 3
    np.testing.assert_allclose(_run(rewritten, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-5)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "SimplifiedLayerNormalization" in [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_quantize_weights_refuses_unknown_linear():
    import pytest

    from qublast.errors import GraphError

    model = _tied_graph(np.zeros((V, H), np.float32))
    with pytest.raises(GraphError, match="no MatMul"):
        qdq.quantize_weights(gs.import_onnx(model), {"missing": {"bits": 8, "block_size": H}}, {}, {"head": "lm_head"}, weights={})
