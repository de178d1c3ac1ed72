"""safetensors bytes with a canonical header, so identical tensors give identical files.

The safetensors library writes its header from a hash map: the order of the keys of
``__metadata__`` changes from one process to the next. ``canonical`` rewrites the header with
sorted keys and no spaces (the layout: 8-byte little-endian header length, the JSON header
padded with spaces to a multiple of 8, then the tensor bytes, which keep their offsets).
"""
from __future__ import annotations

import json
import struct

from safetensors.numpy import save


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted at every level."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def dumps_numpy(tensors: dict, metadata: dict[str, str]) -> bytes:
    """``safetensors.numpy.save`` with a canonical header."""
    return canonical(save(tensors, metadata=metadata))
