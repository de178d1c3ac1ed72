"""Deployment targets as data: what each target stores and runs (no imports beyond the stdlib).

Calibration reads a target's formats and byte costs (so ``--target`` shapes the recipe),
export reads its graph dtype and layouts, the runtime reads its ONNX Runtime options. The
facts behind each entry, with sources, are in ``docs/targets.md``.

A *format* names what a block (or ``lm_head``) stores: ``fp16`` keeps the weight in the
target's float type, the others store integer codes with symmetric scales. A target says,
per format, how the weight is laid out and what happens to the activation that meets it:

- ``act="float"``: the activation stays in the graph's float type (weight-only);
- ``act="static"``: INT8, one static per-tensor scale from calibration (Q/DQ in the graph);
- ``act="dynamic"``: the kernel quantizes each row of the activation to INT8 per block of the
  weight's block size at run time (ONNX Runtime's ``MatMulNBits`` at accuracy level 4:
  scale = max|a| / 127, codes = round_half_even(a * 127 / max|a|); docs/ort-sources.md).

A *mixed* format (``mix``) is a block format only: the block's bulk linears (its widest group,
named per architecture: a gated MLP's gate/up) take the first part, its other linears the
second, as llama.cpp's ``_M`` k-quant mixes keep attention and the MLP's output at more bits.
Each linear is stored in its part's own layout; the mix adds no new layout.

The embedding table is looked up on the host when it is quantized (``embedding.safetensors``,
graph input ``inputs_embeds``): TensorRT has no documented DequantizeLinear -> Gather and ONNX
Runtime does not fuse it. Its formats are the runtime's own and the same on every target.
One exception (``shared_quantized_table``, CPU): a table tied to ``lm_head`` and given
lm_head's format stays in the graph once, as lm_head's codes, which an explicit
``MatMulNBits`` multiplies and a ``GatherBlockQuantized`` looks rows up in (both ONNX Runtime
CPU kernels; docs/targets.md §5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

FLOAT_BYTES = {"float16": 2, "float32": 4}


@dataclass(frozen=True)
class WeightFormat:
    """How one format is stored and computed on a target."""

    name: str
    bits: int | None  # None: kept in the graph's float type
    act: str = "float"  # "float" | "static" | "dynamic" (module docstring)
    per_channel: bool = False  # INT8 per output channel; else blocks along the input
    block_sizes: tuple[int, ...] = ()  # allowed block lengths along the input, preferred first
    mix: tuple[WeightFormat, WeightFormat] | None = None  # (bulk part, rest part) of a mixed block format

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def part(self, bulk: bool) -> WeightFormat:
        """The format one linear of a block in this format takes: a mixed format's bulk or rest part, else itself."""
        if self.mix is None:
            return self
        return self.mix[0] if bulk else self.mix[1]


@dataclass(frozen=True)
class Target:
    """One deployment target (see the module docstring)."""

    name: str
    description: str
    graph_dtype: str  # "float16" | "float32": weights, activations, KV cache and DQ scales
    formats: dict[str, WeightFormat]  # everything a block may take
    head_formats: tuple[str, ...]  # what lm_head may take (a subset of ``formats``)
    ort_session: dict[str, str] = field(default_factory=dict)  # ONNX Runtime session config entries
    norm_fusion: bool = False  # write RMSNorm as x / sqrt(.) so ONNX Runtime fuses it
    # a tied table quantized like lm_head is stored once, in the graph: the token lookup
    # gathers and dequantizes rows of lm_head's own codes (module docstring)
    shared_quantized_table: bool = False
    engine: str | None = None  # "tensorrt": the bundle carries an engine build script
    refused: dict[str, str] = field(default_factory=dict)  # format -> why this target has no such format
    default_candidates: tuple[str, ...] | None = None  # formats calibration tries unless told; None: all

    @property
    def candidates(self) -> tuple[str, ...]:
        """The block formats calibration tries when ``--candidates`` is not given."""
        return self.default_candidates or self.block_formats

    @property
    def float_bytes(self) -> int:
        """Bytes of one unquantized weight or one scale as the graph stores it."""
        return FLOAT_BYTES[self.graph_dtype]

    @property
    def block_formats(self) -> tuple[str, ...]:
        return tuple(self.formats)

    def format(self, name: str) -> WeightFormat:
        """The format ``name`` on this target; ``KeyError`` names why a refused format is absent."""
        if name in self.formats:
            return self.formats[name]
        reason = self.refused.get(name, "not a format of this target")
        raise KeyError(f"format {name!r} is not available on target {self.name!r}: {reason}")


# Host-side embedding table formats (embedding.safetensors): fp16 rows; INT8 with one fp16
# scale per row; INT4 (two codes per byte, low nibble first) with one fp16 scale per block.
EMBED_FORMATS: dict[str, WeightFormat] = {
    "fp16": WeightFormat("fp16", None),
    "w8": WeightFormat("w8", 8, per_channel=True),
    "w4": WeightFormat("w4", 4, block_sizes=(128, 64, 32, 16)),
}
EMBED_SCALE_BYTES = 2  # fp16 scales in embedding.safetensors

_W8_WEIGHT_ONLY_REFUSED = (
    "TensorRT documents weight-only quantization for INT4 only; an INT8 weight-only "
    "DequantizeLinear may be folded into fp16 weights (docs/targets.md): use w8a8 or w4"
)

def mixed(name: str, bulk: WeightFormat, rest: WeightFormat) -> WeightFormat:
    """A mixed block format (module docstring): ``bits`` and ``act`` are the bulk part's, so
    "quantized" keeps its meaning; the parts must agree on what happens to activations that
    are not left in the float type (one activation treatment per block)."""
    acts = {f.act for f in (bulk, rest) if f.bits is not None}
    if len(acts) > 1:
        raise ValueError(f"mixed format {name}: parts {bulk.name} and {rest.name} treat activations differently")
    return WeightFormat(name, bulk.bits, act=bulk.act, block_sizes=bulk.block_sizes, mix=(bulk, rest))


_JETSON_FP16 = WeightFormat("fp16", None)
_JETSON_W4 = WeightFormat("w4", 4, block_sizes=(128, 64))
_CPU_W8 = WeightFormat("w8", 8, act="dynamic", block_sizes=(128, 64, 32, 16))
_CPU_W4 = WeightFormat("w4", 4, act="dynamic", block_sizes=(128, 64, 32, 16))
# INT4 with a scale every 32 weights (ONNX Runtime's MatMulNBits default block): 4.5 bits a weight
# against w4's 4.25-4.125, for less rounding error (docs/targets.md §1)
_CPU_W4S = WeightFormat("w4s", 4, act="dynamic", block_sizes=(32, 16))

TARGETS: dict[str, Target] = {
    "jetson": Target(
        name="jetson",
        description="TensorRT on Jetson Orin / Thor: fp16 graph, strongly typed build",
        graph_dtype="float16",
        formats={
            "fp16": _JETSON_FP16,
            "w8a8": WeightFormat("w8a8", 8, act="static", per_channel=True),
            "w4m": mixed("w4m", _JETSON_W4, _JETSON_FP16),
            "w4": _JETSON_W4,
        },
        head_formats=("fp16", "w4"),
        # the ORT check runs the graph as written (DequantizeLinear, then the float MatMul; Q/DQ on
        # activations as Q/DQ): no fusion into ONNX Runtime's integer or MatMulNBits kernels
        ort_session={"session.disable_quant_qdq": "1"},
        engine="tensorrt",
        refused={"w8": _W8_WEIGHT_ONLY_REFUSED},
        # w8a8 only when asked for (--candidates fp16,w8a8,w4): its static per-tensor activation
        # ranges, fitted on the calibration text, did not carry over to other text on SmolLM2
        # (down_proj's input; docs/results.md, "Jetson: why w8a8 is opt-in")
        default_candidates=("fp16", "w4m", "w4"),
    ),
    "cpu": Target(
        name="cpu",
        description="ONNX Runtime on CPU: fp32 graph, MatMulNBits with INT8 compute",
        graph_dtype="float32",
        formats={
            "fp16": WeightFormat("fp16", None),
            "w8": _CPU_W8,
            "w4m": mixed("w4m", _CPU_W4, _CPU_W8),
            "w4s": _CPU_W4S,
            "w4": _CPU_W4,
        },
        head_formats=("fp16", "w8", "w4s", "w4"),
        ort_session={"session.qdq_matmulnbits_accuracy_level": "4"},
        norm_fusion=True,
        shared_quantized_table=True,
        refused={"w8a8": "ONNX Runtime's dynamic INT8 compute (w8, w4) replaces static activation ranges on CPU"},
        # w4s only when asked for (--candidates fp16,w8,w4m,w4s,w4): on SmolLM2 it made the 5% bundle
        # 0.4 MB smaller for 30 more sweep measurements and slower INT4 MatMuls (docs/results.md)
        default_candidates=("fp16", "w8", "w4m", "w4"),
    ),
}


def get_target(name: str) -> Target:
    """The target ``name``; ``KeyError`` lists the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None


def block_size(fmt: WeightFormat, in_features: int) -> int | None:
    """Scale group length along the input for ``fmt``: the whole row when per channel, else the
    first allowed block size dividing ``in_features``; None when none does (format unavailable)."""
    if fmt.mix is not None:
        raise ValueError(f"{fmt.name} is a mixed format: take the block size of one of its parts")
    if fmt.bits is None:
        return None
    if fmt.per_channel:
        return in_features
    return next((b for b in fmt.block_sizes if in_features % b == 0), None)


def weight_bytes(fmt: WeightFormat, out_features: int, in_features: int, *, float_bytes: int, scale_bytes: int | None = None) -> int:
    """Bytes one [out, in] weight stores in ``fmt``: codes plus one scale per group, or floats."""
    if fmt.mix is not None:
        raise ValueError(f"{fmt.name} is a mixed format: count each linear in its part")
    if fmt.bits is None:
        return float_bytes * out_features * in_features
    size = block_size(fmt, in_features)
    if size is None:
        raise ValueError(f"no {fmt.name} block size divides input size {in_features}")
    groups = in_features // size
    return (out_features * in_features * fmt.bits + 7) // 8 + (scale_bytes or float_bytes) * out_features * groups
