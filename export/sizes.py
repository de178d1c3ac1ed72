"""Sizes read from what a bundle deploys: the files on disk, and the block linears' initializers.

The deployed files are the graph (``model.onnx`` + ``model.onnx.data``) and, when the
embedding table lives on the host, ``embedding.safetensors``. Every tensor in them is stored
as its target keeps it (the Jetson graph is fp16 with INT8/INT4 codes for the formats
TensorRT runs; formats it would fold to fp16 are not offered), so file bytes are deployed bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtime.embedding import FILE as TABLE_FILE

GRAPH_FILES = ("model.onnx", "model.onnx.data")


def deployed_files(bundle: Path) -> dict[str, int]:
    """``{file name: bytes on disk}`` of every file the target loads."""
    names = [*GRAPH_FILES, TABLE_FILE]
    return {name: (bundle / name).stat().st_size for name in names if (bundle / name).is_file()}


def initializer_bytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of an initializer, external data included (no data is loaded)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next(e.value for e in tensor.external_data if e.key == "length"))
    if tensor.raw_data:
        return len(tensor.raw_data)
    if tensor.data_type == onnx.TensorProto.INT4:
        return (int(np.prod(tensor.dims)) + 1) // 2
    return int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def graph_index(proto: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """(initializers by name, the node producing each tensor, the nodes reading each tensor)."""
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    users: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return inits, producers, users


def linear_bytes_in_graph(proto: onnx.ModelProto, node_modules: dict[str, str], paths: set[str]) -> dict[str, int]:
    """Bytes the graph stores for each linear in ``paths``: its weight constant, or the codes and
    scales of its DequantizeLinear, plus a bias added right after its MatMul."""
    inits, producers, users = graph_index(proto)
    out = {}
    for node in proto.graph.node:
        path = node_modules.get(node.name)
        if path not in paths:
            continue
        size = sum(initializer_bytes(inits[n]) for n in _weight_sources(node.input[1], inits, producers))
        for user in users.get(node.output[0], []):
            if user.op_type == "Add":
                size += sum(initializer_bytes(inits[n]) for n in user.input if n in inits)
        out[path] = size
    missing = sorted(paths - set(out))
    if missing:
        raise ValueError(f"graph has no MatMul for {missing[:3]}")
    return out


def _weight_sources(name: str, inits: dict, producers: dict) -> list[str]:
    """Initializers a MatMul weight is made of: itself, or the inputs of its DequantizeLinear / Transpose."""
    if name in inits:
        return [name]
    node = producers.get(name)
    if node is not None and node.op_type in ("DequantizeLinear", "Transpose"):
        return [n for n in node.input if n in inits]
    return []
