"""Build a bundle's TensorRT engine with the TensorRT builder API (the Python twin of build_engine.sh).

``python -m export.build_engine --bundle DIR [--context N] [--workspace-gb G]`` reads
``DIR/model.onnx`` (+ ``model.onnx.data``) and writes ``DIR/model.plan`` (temp file, then
rename). Run it ON THE TARGET: engines are tied to the GPU and the TensorRT version.

- Strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precision comes
  from the graph's Q/DQ nodes and tensor types, no ``FP16``/``INT8`` builder flags. INT4 block
  DequantizeLinear needs TensorRT >= 10.3 (JetPack 6.2).
- One optimisation profile with min/opt/max for every dynamic input, the same shapes as
  ``build_engine.sh`` (``export.engine.profiles``): layers, kv_heads and head_dim from the
  ONNX past inputs, the context from ``--context`` or ``engine_profiles.json``.
- Host memory: the build needs about 3-4x the ONNX model's size (``model.onnx`` +
  ``model.onnx.data``) in RAM (on a Jetson, CPU and GPU share that memory).

A missing or incomplete bundle, or a machine without TensorRT, is one ``qublast: error:`` line
and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from qublast.errors import GraphError, InputError, QublastError
from qublast.files import atomic_write_bytes
from runtime.io_spec import Layout

from . import engine

ONNX_NAME, PLAN_NAME, PROFILES_NAME = "model.onnx", "model.plan", "engine_profiles.json"

Dims = tuple[int, ...]


@dataclass(frozen=True)
class BuildConfig:
    """What to build: the bundle folder, the context (None: from engine_profiles.json), the workspace cap."""

    bundle: Path
    context: int | None = None
    workspace_gb: float | None = None

    def __post_init__(self):
        if self.context is not None and self.context < 2:
            raise InputError(f"--context must be >= 2, got {self.context}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InputError(f"--workspace-gb must be > 0, got {self.workspace_gb}")


def profile_dims(shapes: dict[str, tuple[str, str, str]]) -> dict[str, tuple[Dims, Dims, Dims]]:
    """``{input: ("1x2x0x64", ...)}`` (min, opt, max as trtexec writes them) -> integer tuples.

    Each input needs exactly three shapes of one rank with min <= opt <= max in every dimension.
    """
    out = {}
    for name, points in shapes.items():
        if not isinstance(points, (list, tuple)) or len(points) != 3:
            raise InputError(f"profile of {name} must be [min, opt, max], got {points!r}")
        dims = tuple(_parse_shape(name, p) for p in points)
        if len({len(d) for d in dims}) != 1:
            raise InputError(f"profile of {name} mixes ranks: {list(points)}")
        if any(not lo <= mid <= hi for lo, mid, hi in zip(*dims)):
            raise InputError(f"profile of {name} is not min <= opt <= max: {list(points)}")
        out[name] = dims
    return out


def _parse_shape(name: str, text) -> Dims:
    try:
        dims = tuple(int(v) for v in str(text).split("x"))
    except ValueError:
        raise InputError(f"profile of {name}: {text!r} is not a shape like 1x2x0x64") from None
    if any(d < 0 for d in dims):
        raise InputError(f"profile of {name}: {text!r} has a negative dimension")
    return dims


def read_graph(path: Path):
    """The ONNX proto at ``path`` without its weights (external data is not loaded)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise InputError(f"{path} is not a readable ONNX model: {exc}") from exc


def graph_layout(proto) -> Layout:
    """Family, layers and state shapes from the graph's inputs (io_spec names)."""
    from runtime.io_spec import layout_from_shapes

    shapes = {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
              for i in proto.graph.input}
    try:
        return layout_from_shapes(shapes)
    except ValueError as exc:
        raise GraphError(str(exc)) from exc


def embeds_width(proto) -> int | None:
    """Hidden size of the graph's ``inputs_embeds`` input, or None for a graph taking ``input_ids``."""
    from runtime import io_spec

    for tensor in proto.graph.input:
        if tensor.name == io_spec.INPUTS_EMBEDS:
            dims = tensor.type.tensor_type.shape.dim
            if len(dims) != 3 or not dims[2].HasField("dim_value"):
                raise GraphError(f"{io_spec.INPUTS_EMBEDS} must be [batch, seq, hidden] with a static hidden size")
            return dims[2].dim_value
    return None


def missing_external_data(proto, folder: Path) -> list[str]:
    """External data files the graph names that are not in ``folder``."""
    import onnx

    names = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return sorted(n for n in names if not (folder / n).is_file())


def bundle_context(bundle: Path, context: int | None) -> int:
    """``context`` if given, else the one export wrote to engine_profiles.json."""
    if context is not None:
        return context
    path = bundle / PROFILES_NAME
    if not path.is_file():
        raise InputError(f"{bundle} has no {PROFILES_NAME}: pass --context N")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["context"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is corrupt (no context): {exc}") from exc
    if not isinstance(value, int) or value < 2:
        raise InputError(f"{path}: context must be an integer >= 2, got {value!r}")
    return value


def build_plan(onnx_path: Path, dims: dict[str, tuple[Dims, Dims, Dims]], *, workspace_bytes: int | None = None):
    """Parse ``onnx_path`` into a strongly typed network and build it; returns TensorRT's serialized plan."""
    from runtime.trt_session import BackendUnavailable, import_tensorrt

    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        raise QublastError(f"TensorRT's Python bindings are not installed ({exc.__cause__}): build on the target "
                           f"device, or with trtexec: bash {onnx_path.parent / 'build_engine.sh'}") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GraphError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if tensor.name not in dims:
            if any(d < 0 for d in shape):
                raise GraphError(f"input {tensor.name} {shape} is dynamic but has no optimisation profile")
            continue
        lo, opt, hi = dims[tensor.name]
        if len(lo) != len(shape):
            raise GraphError(f"profile of {tensor.name} has rank {len(lo)}, the input {shape} rank {len(shape)}")
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GraphError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return plan


def build(cfg: BuildConfig) -> Path:
    """Check the bundle, derive the profile, build, and write ``model.plan`` atomically; returns its path."""
    bundle = Path(cfg.bundle)
    onnx_path = bundle / ONNX_NAME
    if not bundle.is_dir():
        raise InputError(f"bundle not found: {bundle}")
    if not onnx_path.is_file():
        raise InputError(f"{bundle} has no {ONNX_NAME}: not a QuBLAST bundle, or written half")
    proto = read_graph(onnx_path)
    try:
        layout = graph_layout(proto)
    except GraphError as exc:
        raise GraphError(f"{onnx_path}: {exc}") from None
    missing = missing_external_data(proto, bundle)
    if missing:
        raise InputError(f"{bundle} is incomplete: {ONNX_NAME} needs {', '.join(missing)}")
    context = bundle_context(bundle, cfg.context)
    shapes = engine.profiles(layout, context=context, hidden=embeds_width(proto))
    workspace = int(cfg.workspace_gb * (1 << 30)) if cfg.workspace_gb else None
    del proto  # the build parses the file itself; keep host memory for it
    plan = build_plan(onnx_path, profile_dims(shapes), workspace_bytes=workspace)
    out = bundle / PLAN_NAME
    atomic_write_bytes(out, memoryview(plan))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.build_engine",
                                description="Build DIR/model.plan from DIR/model.onnx with TensorRT (run on the target).")
    p.add_argument("--bundle", required=True, help="bundle folder (model.onnx, engine_profiles.json)")
    p.add_argument("--context", type=int, help="max tokens (past + new); default: engine_profiles.json's")
    p.add_argument("--workspace-gb", type=float, help="cap on TensorRT's builder workspace (GiB); default: TensorRT's")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = build(BuildConfig(Path(args.bundle), context=args.context, workspace_gb=args.workspace_gb))
    except QublastError as exc:
        print(f"qublast: error: {exc}", file=sys.stderr)
        return 2
    print(f"engine written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
