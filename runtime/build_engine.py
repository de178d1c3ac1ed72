"""Build a bundle's TensorRT engine with the TensorRT builder API (the Python twin of build_engine.sh).

``python -m runtime.build_engine --bundle DIR [--context N] [--workspace-gb G]`` reads
``DIR/model.onnx`` (+ ``model.onnx.data``) and writes ``DIR/model.plan`` (temp file, then
rename). Run it ON THE TARGET: engines are tied to the GPU and the TensorRT version. It needs
the runtime alone (standard library, numpy, TensorRT's Python bindings); ``python -m
export.build_engine`` is the same command under its old name.

- Strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precision comes
  from the graph's Q/DQ nodes and tensor types, no ``FP16``/``INT8`` builder flags. INT4 block
  DequantizeLinear needs TensorRT >= 10.3 (JetPack 6.2).
- One optimisation profile with min/opt/max for every dynamic input, the same shapes as
  ``build_engine.sh`` (``runtime.engine.profiles``): layers, kv_heads and head_dim from the
  ONNX inputs (read by ``runtime.onnx_file``, without the onnx package), the context from
  ``--context`` or ``engine_profiles.json``.
- Host memory: the build needs about 3-4x the ONNX model's size (``model.onnx`` +
  ``model.onnx.data``) in RAM (on a Jetson, CPU and GPU share that memory).

A missing or incomplete bundle, or a machine without TensorRT, is one ``qublast: error:`` line
and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import engine, io_spec
from .onnx_file import OnnxInputs, read_inputs
from .trt_session import BackendUnavailable, import_tensorrt

ONNX_NAME, PLAN_NAME, PROFILES_NAME = "model.onnx", "model.plan", "engine_profiles.json"

Dims = tuple[int, ...]


class BuildError(Exception):
    """A bundle, flag or graph the builder cannot use, or no TensorRT: the CLI prints one line and exits 2."""


@dataclass(frozen=True)
class BuildConfig:
    """What to build: the bundle folder, the context (None: from engine_profiles.json), the workspace cap."""

    bundle: Path
    context: int | None = None
    workspace_gb: float | None = None

    def __post_init__(self):
        if self.context is not None and self.context < 2:
            raise BuildError(f"--context must be >= 2, got {self.context}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise BuildError(f"--workspace-gb must be > 0, got {self.workspace_gb}")


def profile_dims(shapes: dict[str, tuple[str, str, str]]) -> dict[str, tuple[Dims, Dims, Dims]]:
    """``{input: ("1x2x0x64", ...)}`` (min, opt, max as trtexec writes them) -> integer tuples.

    Each input needs exactly three shapes of one rank with min <= opt <= max in every dimension.
    """
    out = {}
    for name, points in shapes.items():
        if not isinstance(points, (list, tuple)) or len(points) != 3:
            raise BuildError(f"profile of {name} must be [min, opt, max], got {points!r}")
        dims = tuple(_parse_shape(name, p) for p in points)
        if len({len(d) for d in dims}) != 1:
            raise BuildError(f"profile of {name} mixes ranks: {list(points)}")
        if any(not lo <= mid <= hi for lo, mid, hi in zip(*dims)):
            raise BuildError(f"profile of {name} is not min <= opt <= max: {list(points)}")
        out[name] = dims
    return out


def _parse_shape(name: str, text) -> Dims:
    try:
        dims = tuple(int(v) for v in str(text).split("x"))
    except ValueError:
        raise BuildError(f"profile of {name}: {text!r} is not a shape like 1x2x0x64") from None
    if any(d < 0 for d in dims):
        raise BuildError(f"profile of {name}: {text!r} has a negative dimension")
    return dims


def read_graph(path: Path) -> OnnxInputs:
    """The input shapes and external data files of the ONNX model at ``path`` (weights are not read)."""
    try:
        return read_inputs(path)
    except ValueError as exc:
        raise BuildError(f"{path} is not a readable ONNX model: {exc}") from None


def graph_layout(shapes: dict[str, tuple]) -> io_spec.Layout:
    """Family, layers and state shapes from the graph's input shapes (io_spec names)."""
    try:
        return io_spec.layout_from_shapes(shapes)
    except ValueError as exc:
        raise BuildError(str(exc)) from exc


def embeds_width(shapes: dict[str, tuple]) -> int | None:
    """Hidden size of the graph's ``inputs_embeds`` input, or None for a graph taking ``input_ids``."""
    dims = shapes.get(io_spec.INPUTS_EMBEDS)
    if dims is None:
        return None
    if len(dims) != 3 or dims[2] < 0:
        raise BuildError(f"{io_spec.INPUTS_EMBEDS} must be [batch, seq, hidden] with a static hidden size")
    return dims[2]


def bundle_context(bundle: Path, context: int | None) -> int:
    """``context`` if given, else the one export wrote to engine_profiles.json."""
    if context is not None:
        return context
    path = bundle / PROFILES_NAME
    if not path.is_file():
        raise BuildError(f"{bundle} has no {PROFILES_NAME}: pass --context N")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["context"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BuildError(f"{path} is corrupt (no context): {exc}") from exc
    if not isinstance(value, int) or value < 2:
        raise BuildError(f"{path}: context must be an integer >= 2, got {value!r}")
    return value


def build_plan(onnx_path: Path, dims: dict[str, tuple[Dims, Dims, Dims]], *, workspace_bytes: int | None = None):
    """Parse ``onnx_path`` into a strongly typed network and build it; returns TensorRT's serialized plan."""
    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        raise BuildError(f"TensorRT's Python bindings are not installed ({exc.__cause__}): build on the target "
                           f"device, or with trtexec: bash {onnx_path.parent / 'build_engine.sh'}") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if tensor.name not in dims:
            if any(d < 0 for d in shape):
                raise BuildError(f"input {tensor.name} {shape} is dynamic but has no optimisation profile")
            continue
        lo, opt, hi = dims[tensor.name]
        if len(lo) != len(shape):
            raise BuildError(f"profile of {tensor.name} has rank {len(lo)}, the input {shape} rank {len(shape)}")
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return plan


def build(cfg: BuildConfig) -> Path:
    """Check the bundle, derive the profile, build, and write ``model.plan`` atomically; returns its path."""
    bundle = Path(cfg.bundle)
    onnx_path = bundle / ONNX_NAME
    if not bundle.is_dir():
        raise BuildError(f"bundle not found: {bundle}")
    if not onnx_path.is_file():
        raise BuildError(f"{bundle} has no {ONNX_NAME}: not a QuBLAST bundle, or written half")
    graph = read_graph(onnx_path)
    try:
        layout = graph_layout(graph.shapes)
    except BuildError as exc:
        raise BuildError(f"{onnx_path}: {exc}") from None
    missing = graph.missing(bundle)
    if missing:
        raise BuildError(f"{bundle} is incomplete: {ONNX_NAME} needs {', '.join(missing)}")
    context = bundle_context(bundle, cfg.context)
    shapes = engine.profiles(layout, context=context, hidden=embeds_width(graph.shapes))
    workspace = int(cfg.workspace_gb * (1 << 30)) if cfg.workspace_gb else None
    plan = build_plan(onnx_path, profile_dims(shapes), workspace_bytes=workspace)
    out = bundle / PLAN_NAME
    write_atomic(out, memoryview(plan))
    return out


def write_atomic(path: Path, data) -> None:
    """Write ``data`` to a temporary file next to ``path`` (``.model.plan.<pid>.*.tmp``, which the
    bundle check ignores as device-built), then rename it over ``path`` (mode 0644). An ``OSError``
    (a full disk, a folder in the way) names ``path``, not the temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.build_engine",
                                description="Build DIR/model.plan from DIR/model.onnx with TensorRT (run on the target).")
    p.add_argument("--bundle", required=True, help="bundle folder (model.onnx, engine_profiles.json)")
    p.add_argument("--context", type=int, help="max tokens (past + new); default: engine_profiles.json's")
    p.add_argument("--workspace-gb", type=float, help="cap on TensorRT's builder workspace (GiB); default: TensorRT's")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = build(BuildConfig(Path(args.bundle), context=args.context, workspace_gb=args.workspace_gb))
    except (BuildError, OSError) as exc:  # OSError: an unreadable model.onnx, a full disk
        print(f"qublast: error: {exc}", file=sys.stderr)
        return 2
    print(f"engine written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
