"""Running a QuBLAST TensorRT engine (``model.plan``), KV cache included (no torch).

``TrtModel`` has ``OrtModel``'s interface (``layout``, ``empty_past``, ``forward``) and feeds
the same inputs (``runtime/io_spec.py``): ``input_ids`` (or ``inputs_embeds``), for attention
an all-ones ``attention_mask`` [B, past + S] and ``position_ids`` ``past .. past + S - 1``, and
the state (past keys/values, conv and SSM states).

I/O binding, per ``forward`` call (simple and correct over fast):

1. every engine input gets its call's shape (``context.set_input_shape``); a shape outside
   the engine's optimisation profile is a ``ValueError`` naming the input;
2. TensorRT then knows every output shape (``context.get_tensor_shape``): logits
   [B, S, V], present.{i}.key/value [B, kv_heads, past + S, head_dim];
3. one device buffer per input and output is allocated for exactly those shapes
   (``cudaMalloc``, at least 256 bytes so an empty past at prefill still has an address),
   inputs are copied host -> device in the engine's dtype (``get_tensor_dtype``: int64 ids,
   fp32 or fp16 past), ``execute_async_v3`` runs on this model's CUDA stream, outputs are
   copied device -> host and the stream is synchronised;
4. every buffer is freed, also when a step fails.

Logits come back as float32; presents in the engine's dtype (fp16 for a Jetson graph), so
they can be fed back unchanged. A graph taking ``inputs_embeds`` gets the rows of the
bundle's host-side embedding table (``runtime.embedding``), cast to the engine's dtype.

TensorRT's Python bindings and cuda-python (``cuda.bindings.runtime``, or the older
``cuda.cudart``) are imported when a model is opened; ``BackendUnavailable`` says which one is
missing. The engine must come from this GPU and TensorRT version (build it on the device).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io_spec

MIN_ALLOC = 256  # bytes: cudaMalloc's alignment; empty tensors (past = 0) still get a real address


class BackendUnavailable(RuntimeError):
    """TensorRT's Python bindings or cuda-python are not installed."""


def import_tensorrt():
    """The ``tensorrt`` module, or ``BackendUnavailable`` saying how to get it."""
    try:
        import tensorrt  # device-only (the Jetson image's bindings): absent here is BackendUnavailable
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT's Python bindings are not installed ({exc}); use --backend ort, or run on a "
            "device with TensorRT >= 10.3 (JetPack 6.2: python3-libnvinfer)") from exc
    return tensorrt


def import_cudart():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, else ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart  # device-only (cuda-python): absent is BackendUnavailable
    except ImportError:
        try:
            from cuda import cudart  # device-only: the older cuda-python layout
        except ImportError as exc:
            raise BackendUnavailable(
                f"cuda-python is not installed ({exc}); pip install 'cuda-python>=12.6,<13'") from exc
    return cudart


def layout_from_engine_shapes(shapes: dict[str, tuple]) -> io_spec.Layout:
    """``io_spec.layout_from_shapes`` for an engine's input shapes (dynamic dims as -1)."""
    return io_spec.layout_from_shapes(shapes)


class TrtModel:
    """A QuBLAST engine in TensorRT: ``forward`` runs prefill or one decode step."""

    def __init__(self, path: str, *, embedding=None):
        trt = import_tensorrt()
        self._cudart = import_cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not load the engine (built for another GPU or "
                             "TensorRT version? rebuild it on this device)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: _numpy_dtype(trt, n, self.engine.get_tensor_dtype(n)) for n in names}
        self.layout = layout_from_engine_shapes({n: tuple(self.engine.get_tensor_shape(n)) for n in self.input_names})
        self.output_names = [io_spec.LOGITS, *self.layout.present_names()]
        self.embeds = io_spec.INPUTS_EMBEDS in names
        if self.embeds and embedding is None:
            raise ValueError(f"{path} takes inputs_embeds: pass the bundle's embedding table")
        self.embedding = embedding
        first = io_spec.INPUTS_EMBEDS if self.embeds else io_spec.INPUT_IDS
        missing = [n for n in [first, *self.output_names] if n not in names]
        allowed = io_spec.input_names(self.layout.num_layers, embeds=self.embeds, family=self.layout.family)
        unknown = sorted(set(self.input_names) - set(allowed))
        if missing or unknown:
            raise ValueError(f"{path}: engine lacks {missing} or has inputs outside io_spec {unknown}: "
                             "not a QuBLAST KV-cache graph")
        self.context = self.engine.create_execution_context()
        self._stream = _cuda(self._cudart, self._cudart.cudaStreamCreate())

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The state before the first token (empty KV cache, zero recurrent states), in the engine's dtypes."""
        return io_spec.empty_state(self.layout, batch, self.dtypes)

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, S, V] (float32) and the state after ``input_ids`` [B, S] following ``past`` (None: start);
        a step-only engine runs once per token."""
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        if self.layout.step_only and seq > 1:
            steps = []
            for t in range(seq):
                logits, past = self.forward(input_ids[:, t : t + 1], past)
                steps.append(logits)
            return np.concatenate(steps, axis=1), past
        embeds = self.embedding.lookup(input_ids) if self.embeds else None
        feeds = io_spec.model_feeds(input_ids, past, layout=self.layout, embeds=embeds)
        inputs = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        for name, array in inputs.items():
            if not self.context.set_input_shape(name, array.shape):
                raise ValueError(f"{name} of shape {array.shape} is outside the engine's optimisation profile")
        outputs = {n: np.empty(self._output_shape(n), self.dtypes[n]) for n in self.output_names}
        self._run(inputs, outputs)
        results = [outputs[n] for n in self.output_names]
        return _as_float32(results[0]), results[1:]

    def _output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT cannot tell the shape of output {name} ({shape}) from the input shapes")
        return shape

    def _run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Bind fresh device buffers for these host arrays, execute, copy outputs back, free."""
        cudart = self._cudart
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with _DeviceBuffers(cudart) as buffers:
            addresses = {name: buffers.alloc(array.nbytes) for name, array in {**inputs, **outputs}.items()}
            for name, array in inputs.items():
                if array.nbytes:
                    _cuda(cudart, cudart.cudaMemcpyAsync(addresses[name], array.ctypes.data, array.nbytes, to_device, self._stream))
            for name, address in addresses.items():
                if not self.context.set_tensor_address(name, address):
                    raise RuntimeError(f"TensorRT refused the device address of {name}")
            if not self.context.execute_async_v3(_handle(self._stream)):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
            for name, array in outputs.items():
                if array.nbytes:
                    _cuda(cudart, cudart.cudaMemcpyAsync(array.ctypes.data, addresses[name], array.nbytes, to_host, self._stream))
            _cuda(cudart, cudart.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        """Release the CUDA stream (the engine and context go with the object)."""
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            self._cudart.cudaStreamDestroy(stream)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class _DeviceBuffers:
    """Device allocations for one call; all freed on exit, also after an error."""

    def __init__(self, cudart):
        self._cudart, self._addresses = cudart, []

    def __enter__(self):
        return self

    def alloc(self, nbytes: int) -> int:
        address = _cuda(self._cudart, self._cudart.cudaMalloc(max(int(nbytes), MIN_ALLOC)))
        self._addresses.append(address)
        return int(address)

    def __exit__(self, exc_type, exc, tb):
        failed = []
        for address in self._addresses:
            err = self._cudart.cudaFree(address)[0]
            if err != self._cudart.cudaError_t.cudaSuccess:
                failed.append(err)
        self._addresses = []
        if failed and exc_type is None:
            raise RuntimeError(f"cudaFree failed: {_error_name(self._cudart, failed[0])}")
        return False


def _cuda(cudart, result):
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {_error_name(cudart, err)}")
    return values[0] if len(values) == 1 else tuple(values)


def _error_name(cudart, err) -> str:
    try:
        return str(cudart.cudaGetErrorName(err)[1])
    except Exception:  # naming the error must not hide it
        return str(err)


def _handle(stream) -> int:
    """The integer handle of a cuda-python stream object (what execute_async_v3 takes)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # device-only: newer cuda-python alone has it
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


def _numpy_dtype(trt, name: str, dtype) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise ValueError(f"engine tensor {name} has dtype {dtype}, which numpy cannot hold (bf16?); "
                         "export the graph with fp32 or fp16 inputs and outputs") from None


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array
