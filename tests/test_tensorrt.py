"""TensorRT backend: engine build CLI, TrtModel I/O binding, the Jetson image.

Without a GPU the binding code runs against a stand-in for ``tensorrt`` and cuda-python that
keeps "device" memory in numpy and executes the graph with ONNX Runtime: it checks what
TrtModel feeds, copies, converts and frees, not TensorRT itself. The tests marked ``gpu`` and
``tensorrt`` build real engines and compare them with ONNX Runtime; they skip without TensorRT.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime import build_engine, engine, io_spec
from runtime.build_engine import BuildError
from runtime.io_spec import Layout, layout_from_shapes
from runtime.session import OrtModel
from runtime.trt_session import BackendUnavailable, TrtModel

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile.jetson"
ENTRYPOINT = ROOT / "docker" / "jetson-entrypoint.sh"
RUNTIME_PROJECT = ROOT / "runtime" / "pyproject.toml"
LAYERS, KV_HEADS, HEAD_DIM, VOCAB, CONTEXT = 2, 2, 4, 11, 16


# ---------------------------------------------------------------- a tiny graph that follows io_spec

def tiny_graph(path: Path, *, half_logits: bool = False, external: bool = True) -> Path:
    """A 2-layer stand-in LM: logits and presents depend on every input (ids, mask, positions, past)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = KV_HEADS * HEAD_DIM
    rng = np.random.default_rng(0)
    consts = {
        "emb": rng.standard_normal((VOCAB, hidden)).astype(np.float32),
        "head": rng.standard_normal((hidden, VOCAB)).astype(np.float32),
        "kv_shape": np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64),
        "last": np.array([-1], np.int64), "axis1": np.array([1], np.int64),
        "pos_scale": np.array(0.1, np.float32), "mask_scale": np.array(0.01, np.float32),
    }
    node = helper.make_node
    nodes = [
        node("Gather", ["emb", io_spec.INPUT_IDS], ["x"]),  # [B, S, H*D]
        node("Cast", [io_spec.POSITION_IDS], ["pos_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["pos_f", "last"], ["pos3"]),  # [B, S, 1]
        node("Cast", [io_spec.ATTENTION_MASK], ["mask_f"], to=TensorProto.FLOAT),
        node("ReduceSum", ["mask_f", "axis1"], ["total"], keepdims=1),  # [B, 1]
        node("Unsqueeze", ["total", "last"], ["total3"]),  # [B, 1, 1]
        node("Mul", ["pos3", "pos_scale"], ["pos_term"]),
        node("Mul", ["total3", "mask_scale"], ["mask_term"]),
        node("Add", ["x", "pos_term"], ["x_pos"]),
        node("Add", ["x_pos", "mask_term"], ["h"]),
        node("MatMul", ["h", "head"], ["logits_f" if half_logits else io_spec.LOGITS]),  # [B, S, V]
        node("Reshape", ["h", "kv_shape"], ["h4"]),  # [B, S, H, D]
        node("Transpose", ["h4"], ["kv"], perm=[0, 2, 1, 3]),  # [B, H, S, D]
    ]
    if half_logits:
        nodes.append(node("Cast", ["logits_f"], [io_spec.LOGITS], to=TensorProto.FLOAT16))
    past_dims = ["batch", KV_HEADS, "past", HEAD_DIM]
    inputs = [helper.make_tensor_value_info(io_spec.INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(io_spec.ATTENTION_MASK, TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info(io_spec.POSITION_IDS, TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info(io_spec.LOGITS, TensorProto.FLOAT16 if half_logits else TensorProto.FLOAT,
                                             ["batch", "seq", VOCAB])]
    for i in range(LAYERS):
        for j, kind in enumerate(io_spec.KV_KINDS):
            scale = f"scale.{i}.{kind}"
            consts[scale] = np.array(1.0 + i - 2.0 * j, np.float32)
            nodes += [node("Mul", ["kv", scale], [f"new.{i}.{kind}"]),
                      node("Concat", [io_spec.past_name(i, kind), f"new.{i}.{kind}"], [io_spec.present_name(i, kind)], axis=2)]
            inputs.append(helper.make_tensor_value_info(io_spec.past_name(i, kind), TensorProto.FLOAT, past_dims))
            outputs.append(helper.make_tensor_value_info(io_spec.present_name(i, kind), TensorProto.FLOAT,
                                                         ["batch", KV_HEADS, "total", HEAD_DIM]))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=256)
    else:
        onnx.save(model, str(path))
    return path


def make_bundle(folder: Path, **graph_kw) -> Path:
    """model.onnx (+ .data) and engine_profiles.json as export writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_graph(folder / "model.onnx", **graph_kw)
    shapes = engine.profiles(Layout("attention", LAYERS, KV_HEADS, HEAD_DIM, {}, step_only=False), context=CONTEXT)
    (folder / "engine_profiles.json").write_text(json.dumps({"target": "jetson", "context": CONTEXT, "shapes": shapes}))
    return folder


def run_steps(model, prompt: list[int], steps: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Prefill then ``steps`` decode steps feeding fixed tokens; every (logits, presents)."""
    logits, past = model.forward(np.asarray([prompt], np.int64))
    out = [(logits, past)]
    for step in range(steps):
        logits, past = model.forward(np.asarray([[(step * 3 + 1) % VOCAB]], np.int64), past)
        out.append((logits, past))
    return out


# ---------------------------------------------------------------- profiles and layout (pure)

def test_profile_dims_parses_engine_profiles():
    dims = build_engine.profile_dims(engine.profiles(Layout("attention", 3, 2, 64, {}, step_only=False), context=256))
    assert sorted(dims) == sorted(io_spec.input_names(3))
    assert dims[io_spec.past_name(2, "value")] == ((1, 2, 0, 64), (1, 2, 128, 64), (1, 2, 255, 64))
    assert dims[io_spec.INPUT_IDS] == ((1, 1), (1, 1), (1, 256))
    assert dims[io_spec.ATTENTION_MASK] == ((1, 1), (1, 129), (1, 511))


@pytest.mark.parametrize("points", [("1x1", "1x2"), ("1x1", "1xa", "1x4"), ("1x1", "1x2x3", "1x4"),
                                    ("1x4", "1x2", "1x3"), ("1x-1", "1x1", "1x2"), "1x1"])
def test_profile_dims_rejects_malformed(points):
    with pytest.raises(BuildError, match="input_ids"):
        build_engine.profile_dims({"input_ids": points})


def test_layout_from_the_onnx_inputs(tmp_path):
    graph = build_engine.read_graph(tiny_graph(tmp_path / "m.onnx"))
    assert build_engine.graph_layout(graph.shapes) == Layout("attention", LAYERS, KV_HEADS, HEAD_DIM, {}, step_only=False)
    assert build_engine.embeds_width(graph.shapes) is None
    assert graph.missing(tmp_path) == []
    (tmp_path / "m.onnx.data").unlink()
    assert graph.missing(tmp_path) == ["m.onnx.data"]


def test_layout_from_engine_shapes():
    shapes = {io_spec.INPUT_IDS: (-1, -1)}
    shapes.update({io_spec.past_name(i, k): (-1, 8, -1, 32) for i in range(3) for k in io_spec.KV_KINDS})
    assert layout_from_shapes(shapes) == Layout("attention", 3, 8, 32, {}, step_only=False)
    with pytest.raises(ValueError, match="static"):
        layout_from_shapes({**shapes, io_spec.past_name(0, "key"): (-1, -1, -1, 32)})
    with pytest.raises(ValueError, match="do not follow io_spec"):
        layout_from_shapes({k: v for k, v in shapes.items() if k != io_spec.past_name(2, "value")})
    with pytest.raises(ValueError, match="unlike"):
        layout_from_shapes({**shapes, io_spec.past_name(1, "value"): (-1, 8, -1, 16)})


# ---------------------------------------------------------------- build CLI errors (no TensorRT needed)

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qublast: error: "), err
    return err[0]


def test_cli_missing_bundle(tmp_path, capsys):
    assert build_engine.main(["--bundle", str(tmp_path / "nope")]) == 2
    assert "bundle not found" in _one_error_line(capsys)


@pytest.mark.parametrize("module", ["runtime.build_engine", "export.build_engine"])  # export's: the old name
def test_cli_runs_as_a_module(tmp_path, module):
    out = subprocess.run([sys.executable, "-m", module, "--bundle", str(tmp_path / "nope")],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"qublast: error: bundle not found: {tmp_path / 'nope'}"]


def test_cli_without_tensorrt(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    bundle = make_bundle(tmp_path / "bundle")
    assert build_engine.main(["--bundle", str(bundle)]) == 2
    line = _one_error_line(capsys)
    assert "TensorRT" in line and "build_engine.sh" in line
    assert not (bundle / "model.plan").exists()


@pytest.mark.parametrize("damage, argv, needle", [
    ("data", [], "incomplete"),
    ("onnx", [], "no model.onnx"),
    ("garbage", [], "not a readable ONNX model"),
    ("profiles", [], "pass --context"),
    (None, ["--context", "1"], "--context must be >= 2"),
    (None, ["--workspace-gb", "0"], "--workspace-gb must be > 0"),
])
def test_cli_rejects_incomplete_bundles(tmp_path, capsys, damage, argv, needle):
    bundle = make_bundle(tmp_path / "bundle")
    if damage == "data":
        (bundle / "model.onnx.data").unlink()
    elif damage == "onnx":
        (bundle / "model.onnx").unlink()
    elif damage == "garbage":
        (bundle / "model.onnx").write_bytes(b"\xff not protobuf \x00" * 8)
    elif damage == "profiles":
        (bundle / "engine_profiles.json").unlink()
    assert build_engine.main(["--bundle", str(bundle), *argv]) == 2
    assert needle in _one_error_line(capsys)


def test_cli_rejects_a_graph_without_kv_cache(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(bundle / "model.onnx"))
    assert build_engine.main(["--bundle", str(bundle), "--context", "8"]) == 2
    assert "not a QuBLAST graph" in _one_error_line(capsys)


# ---------------------------------------------------------------- TrtModel without the backend

def test_trt_model_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        TrtModel(str(tmp_path / "model.plan"))


def test_trt_model_without_cuda_python(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailable, match="cuda-python"):
        TrtModel(str(tmp_path / "model.plan"))


def test_trt_session_imports_no_heavy_modules():
    code = ("import sys, runtime.trt_session\n"
            "print(','.join(sorted(m for m in ('torch', 'transformers', 'qublast', 'export', 'tensorrt', 'cuda') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- a stand-in TensorRT + cuda-python

class _FakeCudart(types.ModuleType):
    """cuda-python's runtime calls that TrtModel uses: ``(err, *values)`` tuples, numpy "device" memory."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorInvalidValue=1)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.heap: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.streams: set[int] = set()

    def cudaMalloc(self, nbytes):
        buf = np.zeros(nbytes, np.uint8)
        self.heap[buf.ctypes.data] = buf
        self.allocations += 1
        return 0, buf.ctypes.data

    def cudaFree(self, address):
        return (0,) if self.heap.pop(address, None) is not None else (1,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if device not in self.heap or nbytes > self.heap[device].nbytes or stream not in self.streams:
            return (1,)
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):
        self.streams.add(4242)
        return 0, 4242

    def cudaStreamSynchronize(self, stream):
        return (0,) if stream in self.streams else (1,)

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorInvalidValue"

    def device_array(self, address: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.heap[address][: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


_ORT_TYPES = {"tensor(int64)": np.dtype(np.int64), "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


class _FakeEngine:
    """An "engine" whose plan is JSON: the ONNX path and the optimisation profile; ORT computes."""

    def __init__(self, plan: dict, cudart: _FakeCudart):
        import onnxruntime as ort

        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profile, self.cudart = plan["profile"], cudart
        self.io = {t.name: ("in", t) for t in self.session.get_inputs()} | {t.name: ("out", t) for t in self.session.get_outputs()}
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return _ORT_TYPES[self.io[name][1].type]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeContext:
    def __init__(self, engine: _FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        ok = len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def _inputs(self, read: bool) -> dict[str, np.ndarray]:
        out = {}
        for name, (mode, _) in self.engine.io.items():
            if mode == "in":
                dtype = self.engine.get_tensor_dtype(name)
                shape = self.shapes[name]
                out[name] = self.engine.cudart.device_array(self.addresses[name], shape, dtype) if read else np.zeros(shape, dtype)
        return out

    def get_tensor_shape(self, name):
        if self.engine.io[name][0] == "in":
            return self.shapes[name]
        return self.engine.session.run([name], self._inputs(read=False))[0].shape

    def set_tensor_address(self, name, address):
        assert isinstance(address, int) and address in self.engine.cudart.heap, name
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int) and stream_handle in self.engine.cudart.streams
        names = [n for n, (mode, _) in self.engine.io.items() if mode == "out"]
        for name, value in zip(names, self.engine.session.run(names, self._inputs(read=True))):
            self.engine.cudart.device_array(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


def _fake_tensorrt(cudart: _FakeCudart) -> types.ModuleType:
    """The slice of TensorRT 10's Python API that build_engine and TrtModel call."""
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.nptype = lambda dtype: dtype.type
    trt.built = []

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnxruntime as ort

            self.path = path
            for t in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs():
                shape = tuple(d if isinstance(d, int) else -1 for d in t.shape)
                self.network.inputs.append(types.SimpleNamespace(name=t.name, shape=shape))
            self.network.onnx = path
            return True

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = [list(lo), list(opt), list(hi)]

    class Config:
        def __init__(self):
            self.profiles, self.pools = [], {}

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            trt.built.append((network, config))
            plan = {"onnx": network.onnx, "profile": dict(config.profiles[0]), "flags": network.flags}
            return json.dumps(plan).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return _FakeEngine(json.loads(bytes(data)), cudart)
            except (ValueError, KeyError):
                return None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fake_backend(monkeypatch):
    """Install the stand-in ``tensorrt`` and ``cuda.bindings.runtime``; yields (trt, cudart)."""
    cudart = _FakeCudart()
    trt = _fake_tensorrt(cudart)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart), ("cuda.bindings.utils", None)):
        monkeypatch.setitem(sys.modules, name, module)
    return trt, cudart


def test_build_with_the_builder_api(tmp_path, fake_backend, capsys):
    trt, _ = fake_backend
    bundle = make_bundle(tmp_path / "bundle")
    assert build_engine.main(["--bundle", str(bundle), "--workspace-gb", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == f"engine written: {bundle / 'model.plan'}"
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # no temp file left
    (network, config), = trt.built
    assert network.flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert config.pools == {"workspace": 1 << 29}
    expected = build_engine.profile_dims(json.loads((bundle / "engine_profiles.json").read_text())["shapes"])
    assert config.profiles == [{name: [list(d) for d in dims] for name, dims in expected.items()}]


def test_trt_model_matches_ort(tmp_path, fake_backend):
    _, cudart = fake_backend
    bundle = make_bundle(tmp_path / "bundle")
    assert build_engine.main(["--bundle", str(bundle)]) == 0
    trt_model, ort_model = TrtModel(str(bundle / "model.plan")), OrtModel(str(bundle / "model.onnx"))
    assert trt_model.layout == ort_model.layout == Layout("attention", LAYERS, KV_HEADS, HEAD_DIM, {}, step_only=False)
    for (logits, presents), (ref_logits, ref_presents) in zip(run_steps(trt_model, [3, 1, 4, 1, 5], 3),
                                                               run_steps(ort_model, [3, 1, 4, 1, 5], 3)):
        assert logits.dtype == np.float32
        np.testing.assert_array_equal(logits, ref_logits)
        assert len(presents) == 2 * LAYERS
        for ours, ref in zip(presents, ref_presents):
            np.testing.assert_array_equal(ours, ref)
    assert presents[0].shape == (1, KV_HEADS, 8, HEAD_DIM)
    assert cudart.heap == {} and cudart.allocations == 4 * (3 + 2 * LAYERS + 1 + 2 * LAYERS)  # 4 calls, every I/O tensor
    trt_model.close()
    assert cudart.streams == set()


def test_trt_model_returns_float32_from_half_outputs(tmp_path, fake_backend):
    bundle = make_bundle(tmp_path / "bundle", half_logits=True)
    assert build_engine.main(["--bundle", str(bundle)]) == 0
    logits, _ = TrtModel(str(bundle / "model.plan")).forward(np.asarray([[1, 2]], np.int64))
    ref, _ = OrtModel(str(bundle / "model.onnx")).forward(np.asarray([[1, 2]], np.int64))
    assert ref.dtype == np.float16 and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, ref.astype(np.float32))


def test_trt_model_refuses_shapes_outside_the_profile(tmp_path, fake_backend):
    _, cudart = fake_backend
    bundle = make_bundle(tmp_path / "bundle")
    assert build_engine.main(["--bundle", str(bundle)]) == 0
    model = TrtModel(str(bundle / "model.plan"))
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        model.forward(np.zeros((1, CONTEXT + 1), np.int64))
    assert cudart.heap == {}


def test_trt_model_refuses_a_foreign_plan(tmp_path, fake_backend):
    (tmp_path / "model.plan").write_bytes(b"engine from another GPU")
    with pytest.raises(ValueError, match="rebuild it on this device"):
        TrtModel(str(tmp_path / "model.plan"))


# ---------------------------------------------------------------- the Jetson image

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, out = "", []
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        if joined.strip():
            word, _, rest = joined.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        joined = ""
    return out


def test_jetson_dockerfile_copies_only_existing_paths():
    copies = [args.split() for word, args in _dockerfile_instructions() if word == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {s.rstrip("/") for args in copies for s in args[:-1]}
    assert {"runtime", "docker/jetson-entrypoint.sh"} <= copied
    assert not copied & {"qublast", "export", "tests", "pyproject.toml"}  # the device image is torch-free


def test_jetson_dockerfile_installs_the_runtime_project():
    """The image installs ./runtime (its own pyproject: numpy, onnxruntime, safetensors, tokenizers) as
    the README does, plus cuda-python; nothing torch-side."""
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "FROM" and "l4t" in instructions[0][1]
    pip = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    assert any(" ./runtime " in f" {args} " and "cuda-python" in args for args in pip)
    assert not any(word in args for args in pip for word in ("torch", "transformers", "onnx-graphsurgeon", " . "))
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads(RUNTIME_PROJECT.read_text())
    assert project["project"]["dependencies"] == ["numpy", "onnxruntime>=1.20", "safetensors", "tokenizers"]
    assert project["tool"]["setuptools"] == {"packages": ["runtime"], "package-dir": {"runtime": "."}}
    assert "runtime" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    entry = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[0])[0] == "/usr/local/bin/qublast-jetson"
    assert any(word == "COPY" and args.split() == ["docker/jetson-entrypoint.sh", "/usr/local/bin/qublast-jetson"]
               for word, args in instructions)


def test_jetson_entrypoint_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_jetson_entrypoint_builds_once_then_generates(tmp_path):
    """A stub build script and a stub python stand in for trtexec and the runtime."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "build_engine.sh").write_text('cd "$(dirname "$0")"; echo built >> builds.txt; echo plan > model.plan\n')
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "QUBLAST_BUNDLE": str(bundle), "PYTHON": str(python)}
    for _ in range(2):
        out = subprocess.run(["bash", str(ENTRYPOINT), "--prompt", "hi there"], check=False, capture_output=True, text=True, env=env, timeout=20)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["-m", "runtime.generate", "--bundle", str(bundle), "--backend", "trt", "--prompt", "hi there"]
    assert (bundle / "builds.txt").read_text() == "built\n"
    missing = subprocess.run(["bash", str(ENTRYPOINT)], check=False, capture_output=True, text=True, timeout=20,
                             env={**env, "QUBLAST_BUNDLE": str(tmp_path / "none")})
    assert missing.returncode == 2 and missing.stderr.startswith("qublast: error: no bundle")


# ---------------------------------------------------------------- real TensorRT (GPU)

def _need_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT's Python bindings are not installed")
    from runtime.trt_session import import_cudart

    try:
        import_cudart()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def _assert_close(trt_steps, ort_steps, tol):
    for (logits, presents), (ref_logits, ref_presents) in zip(trt_steps, ort_steps):
        assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
        np.testing.assert_allclose(logits, ref_logits.astype(np.float32), rtol=tol, atol=tol)
        for ours, ref in zip(presents, ref_presents):
            np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("half_logits", [False, True])
def test_real_engine_matches_ort_on_a_tiny_graph(tmp_path, half_logits):
    _need_tensorrt()
    bundle = make_bundle(tmp_path / "bundle", half_logits=half_logits)
    assert build_engine.main(["--bundle", str(bundle)]) == 0
    model = TrtModel(str(bundle / "model.plan"))
    assert model.layout == Layout("attention", LAYERS, KV_HEADS, HEAD_DIM, {}, step_only=False)
    _assert_close(run_steps(model, [3, 1, 4, 1, 5], 4), run_steps(OrtModel(str(bundle / "model.onnx")), [3, 1, 4, 1, 5], 4),
                  tol=1e-2 if half_logits else 2e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_matches_ort_on_a_tiny_llama(tmp_path):
    """The exported KV-cache graph (opset 21, dynamo) builds strongly typed and agrees (TF32 tolerance)."""
    _need_tensorrt()
    pytest.importorskip("torch")
    from export.onnx_export import export_onnx
    from tests.tiny import tiny_model

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    export_onnx(tiny_model("llama"), bundle / "model.onnx")
    assert build_engine.main(["--bundle", str(bundle), "--context", "32"]) == 0
    prompt = [5, 17, 99, 3, 250, 42]
    _assert_close(run_steps(TrtModel(str(bundle / "model.plan")), prompt, 4),
                  run_steps(OrtModel(str(bundle / "model.onnx")), prompt, 4), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("uniform", ["w4", "w8a8"])
def test_real_engine_runs_a_jetson_bundle(tmp_path, tiny_model_dir, uniform):
    """A Jetson bundle from the CLI (fp16 graph, INT4 or W8A8 blocks, INT8 host-side table, INT4
    lm_head for w4) builds strongly typed with its own script's profiles and agrees with the ONNX
    Runtime check the bundle records (fp16 tolerance), through the runtime's bundle opener."""
    _need_tensorrt()
    from qublast.export import main
    from runtime.bundle import open_bundle

    out = tmp_path / "bundle"
    head = "w4" if uniform == "w4" else "fp16"
    args = ["--model", str(tiny_model_dir), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
            "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "2", "--context", "64", "--uniform", uniform,
            "--embeddings", "w8", "--lm-head", head, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert build_engine.main(["--bundle", str(out)]) == 0
    prompt = [5, 17, 99, 3, 250, 42]
    trt_steps = run_steps(open_bundle(out, backend="trt").model, prompt, 4)
    ort_steps = run_steps(open_bundle(out, backend="ort").model, prompt, 4)
    for (logits, _), (ref, _) in zip(trt_steps, ort_steps):
        np.testing.assert_allclose(logits, ref, rtol=5e-2, atol=5e-2 * float(np.abs(ref).max()))


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_h1"])
def test_real_engine_runs_a_state_model_bundle(tmp_path, family):
    """A Jetson bundle of a state-space or hybrid model: the step graph with its fixed-shape state
    profiles builds, and TensorRT agrees with the bundle's ONNX Runtime check through prefill and decode."""
    _need_tensorrt()
    from qublast.export import main
    from qublast.text import calib_text
    from runtime.bundle import open_bundle
    from tests.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / family
    tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer(calib_text().text).save_pretrained(model_dir)
    out = tmp_path / "bundle"
    assert main(["--model", str(model_dir), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "2", "--context", "64",
                 "--gptq-windows", "4", "--uniform", "w4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert build_engine.main(["--bundle", str(out)]) == 0
    prompt = [5, 17, 99, 3]
    for (logits, _), (ref, _) in zip(run_steps(open_bundle(out, backend="trt").model, prompt, 6),
                                     run_steps(open_bundle(out, backend="ort").model, prompt, 6)):
        np.testing.assert_allclose(logits, ref, rtol=5e-2, atol=5e-2 * float(np.abs(ref).max()))
