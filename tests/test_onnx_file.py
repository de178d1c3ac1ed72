"""runtime.onnx_file reads what the engine builder needs of an ONNX file as the onnx package does,
and refuses a file that is not one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from runtime.onnx_file import read_inputs
from tests.test_tensorrt import tiny_graph


def _reference(path):
    """Input shapes and external data files as the onnx package reads them."""
    proto = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
              for i in proto.graph.input}
    external = sorted({e.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    return shapes, external


def _odd_model():
    """Symbolic, unknown and zero dimensions, an input of unknown rank, initializers sharing a data file."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", None, 0, 7])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT16, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weights = [numpy_helper.from_array(np.full((64,), i, np.float32), f"w{i}") for i in range(3)]
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "odd", [a, b], [y], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [True, False])
def test_matches_onnx_on_a_kv_cache_graph(tmp_path, external):
    path = tiny_graph(tmp_path / "m.onnx", external=external)
    graph = read_inputs(path)
    shapes, files = _reference(path)
    assert graph.shapes == shapes and list(graph.external) == files
    assert list(graph.shapes)[:3] == ["input_ids", "attention_mask", "position_ids"]  # the graph's order
    assert graph.external == (("m.onnx.data",) if external else ())


def test_matches_onnx_on_odd_dimensions_and_shared_data(tmp_path):
    path = tmp_path / "odd.onnx"
    onnx.save(_odd_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    graph = read_inputs(path)
    assert (graph.shapes, list(graph.external)) == _reference(path)
    assert graph.shapes == {"a": (-1, -1, 0, 7), "b": ()}
    assert graph.external == ("weights.bin",)
    assert graph.missing(tmp_path) == []
    (tmp_path / "weights.bin").unlink()
    assert graph.missing(tmp_path) == ["weights.bin"]


def test_a_graph_given_twice_is_merged_as_protobuf_does(tmp_path):
    first = _odd_model().SerializeToString()
    second = tiny_graph(tmp_path / "m.onnx", external=False).read_bytes()
    path = tmp_path / "merged.onnx"
    path.write_bytes(first + second)
    graph = read_inputs(path)
    assert (graph.shapes, list(graph.external)) == _reference(path)
    assert list(graph.shapes)[:2] == ["a", "b"] and "past_key_values.1.value" in graph.shapes


@pytest.mark.parametrize("damage", ["truncated", "wire type", "garbage", "varint"])
def test_refuses_what_is_not_an_onnx_file(tmp_path, damage):
    data = tiny_graph(tmp_path / "m.onnx", external=False).read_bytes()
    data = {"truncated": data[: len(data) // 2], "wire type": data + b"\x0b",  # field 1, wire type 3 (group)
            "garbage": b"\xff not protobuf \x00" * 8, "varint": b"\x08" + b"\xff" * 11}[damage]
    (tmp_path / "bad.onnx").write_bytes(data)
    with pytest.raises(DecodeError):
        onnx.load_from_string(data)  # the onnx package refuses it too
    with pytest.raises(ValueError):
        read_inputs(tmp_path / "bad.onnx")
