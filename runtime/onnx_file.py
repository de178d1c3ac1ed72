"""What the engine builder reads of an ONNX model file, without the onnx package (no import-time work).

An ONNX model is a protobuf ``ModelProto`` (``onnx/onnx.proto``). ``read_inputs`` walks its
wire format and keeps two things: the graph's input shapes (for the optimisation profile) and
the external data files its initializers name (to refuse an incomplete bundle). Weights stored
inside the file are skipped by length, never decoded. The fields read:

| message                | field           | number | kept as                            |
|------------------------|-----------------|--------|------------------------------------|
| ModelProto             | graph           | 7      | GraphProto                         |
| GraphProto             | initializer     | 5      | TensorProto                        |
|                        | input           | 11     | ValueInfoProto                     |
| ValueInfoProto         | name, type      | 1, 2   | str, TypeProto                     |
| TypeProto              | tensor_type     | 1      | TypeProto.Tensor                   |
| TypeProto.Tensor       | shape           | 2      | TensorShapeProto                   |
| TensorShapeProto       | dim             | 1      | Dimension                          |
| Dimension              | dim_value       | 1      | int; -1 when absent (dim_param)    |
| TensorProto            | external_data   | 13     | StringStringEntryProto             |
|                        | data_location   | 14     | 1 = EXTERNAL                       |
| StringStringEntryProto | key, value      | 1, 2   | ``location`` -> file name          |

Wire format: every field is a varint key ``number << 3 | wire_type`` followed by a varint
(wire type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Any other
wire type, or a value running past its message, is a ``ValueError``. A message field given
twice is merged (its encodings concatenated), as protobuf does.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_INPUT = 5, 11
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_SHAPE, SHAPE_DIM, DIM_VALUE = 1, 2, 1, 1
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, EXTERNAL = 13, 14, 1
ENTRY_KEY, ENTRY_VALUE = 1, 2
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class OnnxInputs:
    """A graph's inputs ``{name: dims}`` (a dynamic dimension as -1) and the external data files it names."""

    shapes: dict[str, tuple[int, ...]]
    external: tuple[str, ...]  # sorted, each once

    def missing(self, folder: Path) -> list[str]:
        """External data files not present in ``folder``."""
        return [name for name in self.external if not (Path(folder) / name).is_file()]


def read_inputs(path: str | Path) -> OnnxInputs:
    """Input shapes and external data files of the ONNX model at ``path``; ``ValueError`` when it
    is not a readable protobuf (``OSError`` when it cannot be read)."""
    model = memoryview(Path(path).read_bytes())
    graph = _message(model, MODEL_GRAPH)
    shapes = {}
    for value_info in _repeated(graph, GRAPH_INPUT):
        name = _text(_message(value_info, VALUE_NAME))
        tensor_type = _message(_message(value_info, VALUE_TYPE), TYPE_TENSOR)
        shapes[name] = tuple(_dim(d) for d in _repeated(_message(tensor_type, TENSOR_SHAPE), SHAPE_DIM))
    external = set()
    for tensor in _repeated(graph, GRAPH_INITIALIZER):
        if _last_varint(tensor, TENSOR_DATA_LOCATION) == EXTERNAL:
            entries = (dict(_entry(e)) for e in _repeated(tensor, TENSOR_EXTERNAL_DATA))
            external.update(e["location"] for e in entries if "location" in e)
    return OnnxInputs(shapes, tuple(sorted(external)))


def _dim(dimension: memoryview) -> int:
    value = _last_varint(dimension, DIM_VALUE)
    return -1 if value is None else value


def _entry(entry: memoryview) -> Iterator[tuple[str, str]]:
    key = value = None
    for number, wire, payload in _fields(entry):
        if wire == LENGTH and number == ENTRY_KEY:
            key = _text(payload)
        elif wire == LENGTH and number == ENTRY_VALUE:
            value = _text(payload)
    if key is not None:
        yield key, value or ""


def _message(data: memoryview, number: int) -> memoryview:
    """The (merged) embedded message of field ``number``; empty when absent."""
    parts = list(_repeated(data, number))
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


def _repeated(data: memoryview, number: int) -> Iterator[memoryview]:
    """Every length-delimited value of field ``number``, in order."""
    for found, wire, payload in _fields(data):
        if found == number:
            if wire != LENGTH:
                raise ValueError(f"field {number} has wire type {wire}, expected a message or string")
            yield payload


def _last_varint(data: memoryview, number: int) -> int | None:
    """The last varint of field ``number`` (protobuf keeps the last), as a signed int64; None when absent."""
    value = None
    for found, wire, payload in _fields(data):
        if found == number:
            if wire != VARINT:
                raise ValueError(f"field {number} has wire type {wire}, expected a varint")
            payload &= (1 << 64) - 1
            value = payload - (1 << 64) if payload >= 1 << 63 else payload
    return value


def _text(data: memoryview) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a name is not UTF-8 (byte {exc.start})") from None


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """``(field number, wire type, value)`` of one message: an int for varints, bytes otherwise."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
            continue
        if wire == LENGTH:
            size, pos = _varint(data, pos)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
        else:
            raise ValueError(f"unknown wire type {wire} at byte {pos}")
        if pos + size > end:
            raise ValueError(f"field {number} runs past the end of its message ({size} bytes at byte {pos} of {end})")
        yield number, wire, data[pos : pos + size]
        pos += size


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("a varint runs past the end of its message")
        if shift > 63:
            raise ValueError(f"a varint longer than 10 bytes at byte {pos}")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
