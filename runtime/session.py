"""Running an exported QuBLAST graph with ONNX Runtime, KV cache included (no torch).

Session options come from the bundle (its target's ``ort_session``, recorded in the recipe's
``evaluation.ort_session``), so the runtime runs a bundle exactly as its recorded perplexity
was measured: graph optimisation ORT_ENABLE_ALL plus, for the CPU target,
``session.qdq_matmulnbits_accuracy_level = 4`` (MatMulNBits quantizes each activation row
to INT8 per weight block, the fast kernels); for the Jetson graph
``session.disable_quant_qdq = 1``: the graph runs as written (DequantizeLinear, then the
float MatMul TensorRT's weight-only GEMM computes; activation Q/DQ as Q/DQ), not in ONNX
Runtime's integer kernels (whose x86 path without AVX-VNNI saturates u8 x s8 products) nor
its MatMulNBits.

A graph whose first input is ``inputs_embeds`` needs the bundle's embedding table: ``forward``
still takes token ids and looks their rows up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import io_spec

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class KvLayout:
    """Shape facts read from the graph's past inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int


class OrtModel:
    """An exported causal LM in ONNX Runtime: ``forward`` runs prefill or one decode step."""

    def __init__(self, path: str, *, threads: int | None = None, providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None, embedding=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session_config = dict(session_config or {})
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, str(value))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layout = _kv_layout(self.session)
        self.float_dtype = _NUMPY[inputs[io_spec.past_name(0, "key")].type]
        self.embeds = io_spec.INPUTS_EMBEDS in inputs
        if self.embeds and embedding is None:
            raise ValueError(f"{path} takes inputs_embeds: pass the bundle's embedding table")
        self.embedding = embedding
        self.output_names = io_spec.output_names(self.layout.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for a prefill: 2 * layers arrays [batch, kv_heads, 0, head_dim]."""
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, self.float_dtype) for _ in range(2 * self.layout.num_layers)]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, S, V] (float32) and presents for ``input_ids`` [B, S] after ``past`` (None: prefill)."""
        past = past if past is not None else self.empty_past(input_ids.shape[0])
        embeds = self.embedding.lookup(input_ids).astype(self.float_dtype) if self.embeds else None
        outputs = self.session.run(self.output_names, io_spec.model_feeds(input_ids, past, embeds=embeds))
        return outputs[0], outputs[1:]


def _kv_layout(session) -> KvLayout:
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not pasts or len(pasts) % 2:
        raise ValueError("graph has no past key/value inputs in pairs: not a QuBLAST graph")
    _, kv_heads, _, head_dim = pasts[0].shape
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"past inputs need static kv_heads and head_dim, got {pasts[0].shape}")
    return KvLayout(len(pasts) // 2, kv_heads, head_dim)
