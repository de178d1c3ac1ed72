"""Per-block precision formats and the byte accounting of DESIGN.md.

Every format here is one TensorRT builds on Jetson Orin: symmetric, zero point 0, per output
channel INT8 or block-wise INT4 weight-only scales. Sizes count what the deployed model
stores: quantized weights, their fp16 scales, and fp16 for everything kept.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

FP16_BYTES = 2
PREFERRED_INT4_BLOCK = 128
MIN_INT4_BLOCK = 16


@dataclass(frozen=True)
class Format:
    """A weight (and later activation) precision a block can take."""

    name: str
    weight_bits: int | None  # None: the weight is kept in fp16
    act_bits: int | None = None  # None: activations stay in fp16
    blocked: bool = False  # scales per block along the input dimension (INT4)


FORMATS: dict[str, Format] = {
    "fp16": Format("fp16", None),
    "w8a8": Format("w8a8", 8, act_bits=8),
    "w8": Format("w8", 8),
    "w4": Format("w4", 4, blocked=True),
}
# w8a8 stores the same bytes as w8, so size/PPL budgets gain nothing from it: it is opt-in
# (--candidates fp16,w8a8,w8,w4 or --uniform w8a8) for INT8 tensor-core speed on the device.
CANDIDATES: tuple[str, ...] = ("fp16", "w8", "w4")


def get_format(name: str) -> Format:
    """Look a format up by name; unknown names are an ``InputError``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


def int4_block_size(in_features: int) -> int:
    """Block size along the input: 128 if it divides, else the largest power of two >= 16 that does."""
    if in_features % PREFERRED_INT4_BLOCK == 0:
        return PREFERRED_INT4_BLOCK
    block = PREFERRED_INT4_BLOCK // 2
    while block >= MIN_INT4_BLOCK:
        if in_features % block == 0:
            return block
        block //= 2
    raise InputError(f"input size {in_features} has no INT4 block size (power of two >= 16)")


def block_size_for(fmt: Format, in_features: int) -> int:
    """Scale group length along the input: the whole row for per-channel formats."""
    return int4_block_size(in_features) if fmt.blocked else in_features


def linear_bytes(fmt: Format, out_features: int, in_features: int, *, has_bias: bool = False) -> int:
    """Bytes the deployed model stores for one linear in ``fmt`` (weights, scales, bias)."""
    bias = FP16_BYTES * out_features if has_bias else 0
    if fmt.weight_bits is None:
        return FP16_BYTES * out_features * in_features + bias
    groups = in_features // block_size_for(fmt, in_features)
    weight = (out_features * in_features * fmt.weight_bits + 7) // 8
    return weight + FP16_BYTES * out_features * groups + bias
