"""The host-side embedding table (``embedding.safetensors``): layout, writer, lookup (no torch).

A bundle stores its embedding table here, outside the graph, whenever the table or lm_head
is quantized; the runtime gathers the rows of the prompt's ids, dequantizes them and feeds
``inputs_embeds`` (NVIDIA's TensorRT Edge-LLM does the same with ``embedding.safetensors``;
TensorRT documents no DequantizeLinear -> Gather, docs/targets.md). Layout, version 1:

| tensor            | dtype   | shape          | meaning                                            |
|-------------------|---------|----------------|----------------------------------------------------|
| `embedding`       | float16 | [V, H]         | format fp16: the rows                              |
|                   | int8    | [V, H]         | format w8: codes, one scale per row                |
|                   | uint8   | [V, H / 2]     | format w4: codes in [-8, 7], two per byte, element |
|                   |         |                | 2k in the low nibble                               |
| `embedding.scale` | float16 | [V, H / block] | w8 / w4: row r, block g is codes * scale[r, g]     |

Metadata: ``format`` = "qublast-embedding", ``version`` = "1", ``weight_format``, ``bits``,
``block_size``, ``rows``, ``width``. Rows are what the model's embedding module outputs (for
Gemma already multiplied by its scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .stfile import dumps_numpy

FILE = "embedding.safetensors"
TABLE_FORMAT = "qublast-embedding"
TABLE_VERSION = "1"


class EmbeddingError(ValueError):
    """The table file is missing, corrupt or of an unknown layout."""


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """Codes [V, H] in [-8, 7] (or unsigned in [0, 15]; H even) -> uint8 [V, H / 2], element 2k in the
    low nibble: the one INT4 packing (ONNX INT4, MatMulNBits, the table file, ``scales.safetensors``)."""
    nibbles = codes.astype(np.int8).view(np.uint8) & 0x0F
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., H / 2] -> int8 codes [..., H] (sign-extended nibbles)."""
    low = (packed & 0x0F).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    codes = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)
    return np.where(codes > 7, codes - 16, codes).astype(np.int8)


def write_table(path: str | Path, *, weight_format: str, rows: np.ndarray, scale: np.ndarray | None = None,
                bits: int | None = None, block_size: int | None = None) -> None:
    """Write the table: ``rows`` fp16 [V, H] (fp16), or int8 codes [V, H] with fp16 scales [V, G]."""
    width = rows.shape[1]
    tensors = {"embedding": np.ascontiguousarray(rows.astype(np.float16) if bits is None else
                                                 (pack_int4_rows(rows) if bits == 4 else rows.astype(np.int8)))}
    if bits is not None:
        tensors["embedding.scale"] = np.ascontiguousarray(scale.astype(np.float16))
    metadata = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "weight_format": weight_format,
                "bits": str(bits or 16), "block_size": str(block_size or width), "rows": str(rows.shape[0]),
                "width": str(width)}
    Path(path).write_bytes(dumps_numpy(tensors, metadata))


@dataclass
class EmbeddingTable:
    """A loaded table: ``lookup(ids)`` gives the rows the graph's ``inputs_embeds`` takes."""

    data: np.ndarray
    scale: np.ndarray | None
    bits: int
    block_size: int
    width: int

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingTable:
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                data = f.get_tensor("embedding")
                scale = f.get_tensor("embedding.scale") if "embedding.scale" in f.keys() else None
        except (OSError, SafetensorError) as exc:
            raise EmbeddingError(f"cannot read the embedding table {path}: {exc}") from exc
        if meta.get("format") != TABLE_FORMAT or meta.get("version") != TABLE_VERSION:
            raise EmbeddingError(f"{path} is not a version {TABLE_VERSION} QuBLAST embedding table")
        bits, block, width = int(meta["bits"]), int(meta["block_size"]), int(meta["width"])
        if bits != 16 and (scale is None or scale.shape != (data.shape[0], width // block)):
            raise EmbeddingError(f"{path}: scales do not fit a {bits}-bit table of width {width}, block {block}")
        return cls(data, scale, bits, block, width)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 [..., H] rows of ``ids`` [...], dequantized as the bundle stores them."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise ValueError(f"token id out of range for an embedding table of {self.rows} rows")
        data = self.data[ids]
        if self.bits == 16:
            return data.astype(np.float32)
        codes = unpack_int4_rows(data) if self.bits == 4 else data
        groups = codes.astype(np.float32).reshape(*ids.shape, self.width // self.block_size, self.block_size)
        return (groups * self.scale[ids].astype(np.float32)[..., None]).reshape(*ids.shape, self.width)
