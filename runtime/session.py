"""Running an exported QuBLAST graph with ONNX Runtime, KV cache included (no torch).

Session options used for every measurement (state them with any number they produce):
graph optimisation ORT_ENABLE_ALL, ``session.qdq_matmulnbits_accuracy_level = 1`` (fp32
compute in fused INT4/INT8 weight-only MatMuls; the default, 4, quantizes activations to INT8
and shifts logits by ~1-2%), intra-op threads as given (default: all cores).

INT8 activations (``w8a8``): ONNX Runtime fuses Q/DQ -> MatMul into MatMulIntegerToFloat,
whose x86 kernel without AVX-VNNI multiplies u8 x s8 pairs into saturating int16 (measured:
logits off by ~5e-2 on a tiny model). ``int8_fusion=False`` sets
``session.disable_quant_qdq = 1`` so the graph runs exactly as written (what TensorRT
computes); verification uses it whenever a graph has activation Q/DQ, speed runs may not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import io_spec

ACCURACY_LEVEL = "1"


@dataclass(frozen=True)
class KvLayout:
    """Shape facts read from the graph's past inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int


class OrtModel:
    """An exported causal LM in ONNX Runtime: ``forward`` runs prefill or one decode step."""

    def __init__(self, path: str, *, threads: int | None = None, providers: list[str] | None = None, int8_fusion: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", ACCURACY_LEVEL)
        if not int8_fusion:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.int8_fusion = int8_fusion
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.layout = _kv_layout(self.session)
        self.output_names = io_spec.output_names(self.layout.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0 for a prefill: 2 * layers arrays [batch, kv_heads, 0, head_dim]."""
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.layout.num_layers)]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, S, V] and presents for ``input_ids`` [B, S] after ``past`` (None: prefill)."""
        past = past if past is not None else self.empty_past(input_ids.shape[0])
        feeds = io_spec.model_feeds(input_ids, past)
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]


def _kv_layout(session) -> KvLayout:
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not pasts or len(pasts) % 2:
        raise ValueError("graph has no past key/value inputs in pairs: not a QuBLAST graph")
    _, kv_heads, _, head_dim = pasts[0].shape
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"past inputs need static kv_heads and head_dim, got {pasts[0].shape}")
    return KvLayout(len(pasts) // 2, kv_heads, head_dim)
