"""Per-block precision formats and their byte costs, as each deployment target stores them.

The formats themselves are data in ``runtime/targets.py`` (shared with export and the
runtime, which imports no torch); this module gives calibration the checked views it needs:
a format on a target, its scale group length for one linear, and the bytes it stores.
Every size here counts what the target's graph holds: integer codes, one scale per group in
the graph's float type (fp16 on Jetson, fp32 on the CPU target), and unquantized weights in
the graph's float type.
"""
from __future__ import annotations

from runtime.targets import EMBED_FORMATS, EMBED_SCALE_BYTES, TARGETS, Target, WeightFormat, block_size, weight_bytes

from .errors import InputError

FP16_BYTES = 2  # the reference: every size reduction is against the fp16 checkpoint
# every name a target uses or refuses (the command line's choices, the recipe check)
ALL_FORMATS: tuple[str, ...] = tuple(dict.fromkeys(name for t in TARGETS.values() for name in (*t.formats, *t.refused)))


def get_target(name: str) -> Target:
    """The deployment target ``name``; unknown names are an ``InputError``."""
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None


def get_format(name: str, target: Target) -> WeightFormat:
    """Format ``name`` as ``target`` stores it; unknown or refused formats are an ``InputError``."""
    if name not in ALL_FORMATS:
        raise InputError(f"unknown format {name!r}; known: {', '.join(ALL_FORMATS)}")
    try:
        return target.format(name)
    except KeyError as exc:
        raise InputError(exc.args[0]) from None


def linear_format(fmt: WeightFormat, spec, linear: str) -> WeightFormat:
    """The plain format ``linear`` (relative to its block) takes in a block of format ``fmt``:
    a mixed format's bulk part for the architecture's bulk linears, its rest part otherwise."""
    return fmt.part(linear in spec.bulk)


def embed_format(name: str) -> WeightFormat:
    """Format of the host-side embedding table (the same on every target)."""
    try:
        return EMBED_FORMATS[name]
    except KeyError:
        raise InputError(f"unknown embedding format {name!r}; known: {', '.join(EMBED_FORMATS)}") from None


def block_size_for(fmt: WeightFormat, in_features: int) -> int:
    """Scale group length along the input: the whole row when per channel, else a block size
    the target accepts that divides ``in_features``."""
    size = block_size(fmt, in_features)
    if size is None:
        raise InputError(f"input size {in_features} has no {fmt.name} block size (allowed: {fmt.block_sizes})")
    return size


def fits(fmt: WeightFormat, in_features: int) -> bool:
    """True when the plain format ``fmt`` can store a weight with ``in_features`` inputs (a block size divides it)."""
    return fmt.bits is None or block_size(fmt, in_features) is not None


def linear_bytes(fmt: WeightFormat, out_features: int, in_features: int, *, target: Target, has_bias: bool = False) -> int:
    """Bytes ``target`` stores for one linear in ``fmt`` (weights, scales, bias in the graph's float type)."""
    bias = target.float_bytes * out_features if has_bias else 0
    return weight_bytes(fmt, out_features, in_features, float_bytes=target.float_bytes) + bias


def table_bytes(fmt: WeightFormat, rows: int, width: int) -> int:
    """Bytes of the host-side embedding table in ``fmt`` (codes plus fp16 scales, or fp16 rows)."""
    return weight_bytes(fmt, rows, width, float_bytes=FP16_BYTES, scale_bytes=EMBED_SCALE_BYTES)
