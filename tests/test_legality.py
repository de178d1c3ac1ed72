"""TensorRT legality rules on tiny hand-built QDQ graphs, checked by onnx.checker and ONNX Runtime.

The Q/DQ rules are checked on fp32 graphs (``graph_dtype="float32"``); the fp16-graph rules of
the Jetson target on fp16 graphs at the end."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.legality import check_trt_legal, violations
from export.qdq import pack_int4
from qublast.errors import GraphError

M, K, N, BLOCK = 3, 128, 4, 64
ACCURACY_LEVEL = "1"  # fp32 math in fused weight-only MatMuls, what the Jetson graph's ORT check uses
RNG = np.random.default_rng(0)
Q8 = RNG.integers(-128, 128, size=(K, N)).astype(np.int8)  # [in, out]
S8 = (RNG.random(N).astype(np.float32) * 0.01 + 0.001).astype(np.float16).astype(np.float32)  # [out]
Q4 = RNG.integers(-8, 8, size=(K, N)).astype(np.int8)  # [in, out]
S4 = (RNG.random((K // BLOCK, N)).astype(np.float32) * 0.1 + 0.01).astype(np.float16).astype(np.float32)  # [G, out]
X = RNG.standard_normal((M, K)).astype(np.float32)


def _model(nodes, inits, *, opset: int = 21, extra_opsets=(), out_shape=(M, N)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _int8_model(*, opset: int = 21, zero_point: np.ndarray | None = None) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(Q8, "w.q"), numpy_helper.from_array(S8, "w.scale")]
    dq_inputs = ["w.q", "w.scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "w.zp"))
        dq_inputs.append("w.zp")
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["w.dq"], name="w.dq", axis=1),
        helper.make_node("MatMul", ["x", "w.dq"], ["y"], name="mm"),
    ]
    return _model(nodes, inits, opset=opset)


def _int4_model(*, codes: onnx.TensorProto | None = None, block_size: int | None = BLOCK, consumer: str = "MatMul",
                zero_point: onnx.TensorProto | None = None) -> onnx.ModelProto:
    inits = [codes if codes is not None else pack_int4("w.q", Q4), numpy_helper.from_array(S4, "w.scale")]
    dq_inputs = ["w.q", "w.scale"]
    if zero_point is not None:
        inits.append(zero_point)
        dq_inputs.append(zero_point.name)
    attrs = {"axis": 0}
    if block_size is not None:
        attrs["block_size"] = block_size
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["w.dq"], name="w.dq", **attrs)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "w.dq"], ["y"], name="mm"))
        return _model(nodes, inits)
    nodes.append(helper.make_node(consumer, ["x", "w.dq"], ["y"], name="op"))
    return _model(nodes, inits, out_shape=(K, N))


def _act_qdq_model(*, scale: np.ndarray, q_attrs: dict | None = None, zp: onnx.TensorProto | None = None) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(INT8 weight DQ)."""
    inits = [numpy_helper.from_array(Q8, "w.q"), numpy_helper.from_array(S8, "w.scale"),
             numpy_helper.from_array(scale, "x.scale")]
    q_inputs = ["x", "x.scale"]
    if zp is not None:
        inits.append(zp)
        q_inputs.append(zp.name)
    q_attrs = q_attrs or {}
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["x.q"], name="x.q", **q_attrs),
        helper.make_node("DequantizeLinear", ["x.q", "x.scale"] + ([zp.name] if zp is not None else []), ["x.dq"],
                         name="x.dq", **{k: v for k, v in q_attrs.items() if k == "axis"}),
        helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w.dq"], name="w.dq", axis=1),
        helper.make_node("MatMul", ["x.dq", "w.dq"], ["y"], name="mm"),
    ]
    return _model(nodes, inits)


def _run(model: onnx.ModelProto) -> np.ndarray:
    """Output ``y`` without graph optimisation and with the options runtime.session measures with.

    The two must agree: ORT fuses DQ + MatMul into MatMulNBits, and only accuracy level 1
    keeps activations in fp32 there.
    """
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.SessionOptions()
    fused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    fused.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", ACCURACY_LEVEL)
    outs = [
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": X})[0]
        for opts in (plain, fused)
    ]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    return outs[0]


def _unpack_int4(tensor: onnx.TensorProto) -> np.ndarray:
    """Independent decoder: element 2k in the low nibble of byte k, two's complement."""
    raw = np.frombuffer(tensor.raw_data, dtype=np.uint8)
    nib = np.empty(raw.size * 2, dtype=np.int16)
    nib[0::2] = raw & 0x0F
    nib[1::2] = raw >> 4
    nib = np.where(nib >= 8, nib - 16, nib)
    count = int(np.prod(tensor.dims))
    return nib[:count].reshape(tuple(tensor.dims))


# ---- legal graphs -------------------------------------------------------------------------

def test_int8_per_channel_is_legal_and_runs():
    model = _int8_model()
    assert violations(model, graph_dtype="float32") == []
    check_trt_legal(model, graph_dtype="float32")
    onnx.checker.check_model(model, full_check=True)
    expected = X @ (Q8.astype(np.float32) * S8[None, :])
    np.testing.assert_allclose(_run(model), expected, rtol=1e-5, atol=1e-5)


def test_int8_zero_point_zero_is_legal():
    model = _int8_model(zero_point=np.zeros(N, np.int8))
    assert violations(model, graph_dtype="float32") == []
    np.testing.assert_allclose(_run(model), X @ (Q8 * S8[None, :]), rtol=1e-5, atol=1e-5)


def test_int4_blocked_is_legal_and_runs():
    model = _int4_model()
    assert violations(model, graph_dtype="float32") == []
    check_trt_legal(model, graph_dtype="float32")
    onnx.checker.check_model(model, full_check=True)
    w = Q4.astype(np.float32) * np.repeat(S4, BLOCK, axis=0)  # [K, N]
    np.testing.assert_allclose(_run(model), X @ w, rtol=1e-5, atol=1e-5)


# ---- illegal graphs, one rule each --------------------------------------------------------

def _assert_only(model: onnx.ModelProto, fragment: str) -> None:
    found = violations(model, graph_dtype="float32")
    assert len(found) == 1, found
    assert fragment in found[0], found
    with pytest.raises(GraphError, match="not TensorRT-legal"):
        check_trt_legal(model, graph_dtype="float32")


def test_opset_20_is_reported():
    _assert_only(_int8_model(opset=20), "opset is 20")


def test_nonzero_zero_point_is_reported():
    zp = np.zeros(N, np.int8)
    zp[2] = 3
    _assert_only(_int8_model(zero_point=zp), "zero point is not 0")


def test_non_constant_zero_point_is_reported():
    model = _int8_model()
    dq = model.graph.node[0]
    dq.input.append("zp_in")
    model.graph.input.append(helper.make_tensor_value_info("zp_in", TensorProto.INT8, [N]))
    _assert_only(model, "zero point is not a constant")


def test_per_channel_activation_scale_is_reported():
    zp = numpy_helper.from_array(np.zeros(K, np.int8), "x.zp")
    model = _act_qdq_model(scale=np.full(K, 0.05, np.float32), q_attrs={"axis": 1}, zp=zp)
    _assert_only(model, "activation scale is not per tensor")


def test_quantize_to_int4_by_output_dtype_is_reported():
    model = _act_qdq_model(scale=np.array(0.05, np.float32), q_attrs={"output_dtype": TensorProto.INT4})
    _assert_only(model, "only be quantized to INT8")


def test_quantize_to_int4_by_zero_point_is_reported():
    zp = helper.make_tensor("x.zp", TensorProto.INT4, [], [0])
    model = _act_qdq_model(scale=np.array(0.05, np.float32), zp=zp)
    onnx.checker.check_model(model)  # well-formed ONNX, just not for TensorRT
    _assert_only(model, "only be quantized to INT8")


def test_int8_activation_per_tensor_is_legal_and_runs():
    zp = numpy_helper.from_array(np.array(0, np.int8), "x.zp")
    model = _act_qdq_model(scale=np.array(0.05, np.float32), zp=zp)
    assert violations(model, graph_dtype="float32") == []
    onnx.checker.check_model(model, full_check=True)
    x_dq = np.clip(np.rint(X / 0.05), -128, 127).astype(np.float32) * np.float32(0.05)
    np.testing.assert_allclose(_run(model), x_dq @ (Q8 * S8[None, :]), rtol=1e-5, atol=1e-5)


def test_int4_3d_initializer_is_reported():
    codes = pack_int4("w.q", Q4.reshape(2, K // 2, N))
    _assert_only(_int4_model(codes=codes), "3-D")


def test_int4_without_block_size_is_reported():
    _assert_only(_int4_model(block_size=None), "without block_size")


def test_int4_block_size_outside_tensorrts_is_reported():
    _assert_only(_int4_model(block_size=32), "block size 32 is not one TensorRT supports")


def test_int4_odd_last_dimension_is_reported():
    odd = RNG.integers(-8, 8, size=(K, 3)).astype(np.int8)
    inits = [pack_int4("w.q", odd), numpy_helper.from_array(S4[:, :3].copy(), "w.scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w.dq"], name="w.dq", axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "w.dq"], ["y"], name="mm")]
    _assert_only(_model(nodes, inits, out_shape=(M, 3)), "last dimension 3 is odd")


def test_int4_feeding_add_is_reported():
    _assert_only(_int4_model(consumer="Add"), "must feed MatMul/Gemm")  # not run: only the rule matters


def test_int4_nonzero_zero_point_is_reported():
    zp = pack_int4("w.zp", np.ones((K // BLOCK, N), np.int8))
    _assert_only(_int4_model(zero_point=zp), "zero point is not 0")


def test_non_int_weight_type_is_reported():
    model = _int8_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(Q8.astype(np.int32), "w.q"))
    _assert_only(model, "INT32 is not INT8/INT4")


def test_microsoft_op_is_reported():
    model = _int8_model()
    model.graph.node.append(helper.make_node("Gelu", ["y"], ["y2"], name="gelu", domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _assert_only(model, "com.microsoft::Gelu")


def test_several_violations_are_all_listed():
    model = _int8_model(opset=20, zero_point=np.ones(N, np.int8))
    model.graph.node.append(helper.make_node("Gelu", ["y"], ["y2"], name="gelu", domain="com.microsoft"))
    model.graph.node.append(helper.make_node("FusedMatMul", ["y"], ["y3"], name="fmm", domain="com.microsoft"))
    found = violations(model, graph_dtype="float32")
    assert len(found) == 4
    with pytest.raises(GraphError, match=r"\(\+1 more\)"):
        check_trt_legal(model, graph_dtype="float32")


# ---- pack_int4 ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (7,), (1, 1), (2, 3, 5)])
def test_pack_int4_round_trip(shape):
    q = np.random.default_rng(1).integers(-8, 8, size=shape).astype(np.int8)
    tensor = pack_int4("t", q)
    assert tensor.name == "t" and tensor.data_type == TensorProto.INT4
    assert tuple(tensor.dims) == shape
    assert len(tensor.raw_data) == (q.size + 1) // 2
    assert np.array_equal(_unpack_int4(tensor), q)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int8), q)


def test_pack_int4_nibble_order():
    tensor = pack_int4("t", np.array([1, -2, 7, -8, 3], np.int8))
    # low nibble first: (1, -2=0xE) -> 0xE1, (7, -8=0x8) -> 0x87, (3, pad 0) -> 0x03
    assert tensor.raw_data == bytes([0xE1, 0x87, 0x03])


@pytest.mark.parametrize("bad", [8, -9, 127, -128])
def test_pack_int4_out_of_range(bad):
    q = np.zeros((2, 2), np.int8)
    q[1, 0] = bad
    with pytest.raises(GraphError, match="out of range"):
        pack_int4("t", q)


# ---- fp16 graphs (the Jetson target) -------------------------------------------------------

def _fp16_model(*, weight_dtype=np.float16, scale_dtype=np.float16, logits=TensorProto.FLOAT) -> onnx.ModelProto:
    """x (fp16) -> MatMul(DQ(INT4 w, scale)) -> MatMul(float weight) -> Cast -> logits."""
    inits = [pack_int4("w.q", Q4), numpy_helper.from_array(S4.astype(scale_dtype), "w.scale"),
             numpy_helper.from_array(RNG.standard_normal((N, N)).astype(weight_dtype), "w2")]
    nodes = [
        helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w.dq"], name="w.dq", axis=0, block_size=BLOCK),
        helper.make_node("MatMul", ["x", "w.dq"], ["h"], name="mm"),
    ]
    if weight_dtype == np.float32:  # the fp32 matmul a Jetson graph must not have
        nodes.append(helper.make_node("Cast", ["h"], ["h32"], name="up", to=TensorProto.FLOAT))
        nodes.append(helper.make_node("MatMul", ["h32", "w2"], ["y"], name="mm2"))
    else:
        nodes.append(helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"))
    nodes.append(helper.make_node("Cast", ["y"], ["logits"], name="to_logits", to=logits))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [M, K])],
                              [helper.make_tensor_value_info("logits", logits, [M, N])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_fp16_graph_is_legal_and_runs():
    model = _fp16_model()
    assert violations(model) == []
    onnx.checker.check_model(model, full_check=True)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": X.astype(np.float16)})[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_fp32_matmul_in_an_fp16_graph_is_rejected():
    found = violations(_fp16_model(weight_dtype=np.float32))
    assert any("mm2: MatMul computes in fp32" in f for f in found), found
    assert any("initializer w2 [4, 4] is fp32" in f for f in found), found
    with pytest.raises(GraphError, match="not TensorRT-legal"):
        check_trt_legal(_fp16_model(weight_dtype=np.float32))


def test_fp32_dequantize_scale_in_an_fp16_graph_is_rejected():
    found = violations(_fp16_model(scale_dtype=np.float32))
    assert any("DequantizeLinear scale is not fp16" in f for f in found), found


def test_ssm_fp32_island_is_legal_and_an_fp32_op_outside_it_is_not():
    """Mamba's A = -exp(A_log) stays fp32 (the state update's island); an fp32 Tanh does not belong there."""
    model = _fp16_model()
    a_log = numpy_helper.from_array(RNG.standard_normal((N,)).astype(np.float32), "A_log")
    model.graph.initializer.append(a_log)
    model.graph.node.extend([helper.make_node("Exp", ["A_log"], ["a_exp"], name="exp"),
                             helper.make_node("Neg", ["a_exp"], ["A"], name="neg")])
    model.graph.output.append(helper.make_tensor_value_info("A", TensorProto.FLOAT, [N]))
    assert violations(model) == []
    model.graph.node.append(helper.make_node("Tanh", ["A"], ["r"], name="tanh"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [N]))
    assert violations(model) == ["tanh: Tanh outputs fp32, outside the fp32 islands an fp16 graph allows"]


def test_fp16_logits_are_rejected():
    assert any("logits output is not fp32" in f for f in violations(_fp16_model(logits=TensorProto.FLOAT16)))


def test_op_outside_tensorrts_operator_table_is_reported():
    model = _int8_model()
    model.graph.node.append(helper.make_node("StringNormalizer", ["y"], ["y2"], name="strnorm"))
    _assert_only(model, "StringNormalizer is not in the TensorRT ONNX parser's operator table")
