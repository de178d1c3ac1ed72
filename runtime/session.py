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

import numpy as np

from . import io_spec

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtModel:
    """An exported causal LM in ONNX Runtime: ``forward`` runs a prefill or one decode step.

    ``layout`` (``io_spec.Layout``) tells the family and state shapes from the graph's inputs. A
    step-only graph (state-space and hybrid families) is run once per token of a prefill."""

    def __init__(self, path: str, *, threads: int | None = None, providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None, embedding=None):
        import onnxruntime as ort  # only the ort backend needs it: a TensorRT-only device may lack it

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session_config = dict(session_config or {})
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, str(value))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layout = io_spec.layout_from_shapes({n: tuple(i.shape) for n, i in inputs.items()})
        self.dtypes = {n: _NUMPY[i.type] for n, i in inputs.items() if i.type in _NUMPY}
        first_state = self.layout.past_names()[0]
        self.float_dtype = self.dtypes[first_state] if first_state not in self.layout.recurrent else self.dtypes[
            io_spec.past_name(0, "conv")]
        self.embeds = io_spec.INPUTS_EMBEDS in inputs
        if self.embeds and embedding is None:
            raise ValueError(f"{path} takes inputs_embeds: pass the bundle's embedding table")
        self.embedding = embedding
        self.output_names = [io_spec.LOGITS, *self.layout.present_names()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The state before the first token (empty KV cache, zero recurrent states)."""
        return io_spec.empty_state(self.layout, batch, self.dtypes)

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, S, V] (float32) and the state after ``input_ids`` [B, S] following ``past`` (None: start)."""
        past = past if past is not None else self.empty_past(input_ids.shape[0])
        if self.layout.step_only and input_ids.shape[1] > 1:
            steps = []
            for t in range(input_ids.shape[1]):
                logits, past = self.forward(input_ids[:, t : t + 1], past)
                steps.append(logits)
            return np.concatenate(steps, axis=1), past
        embeds = self.embedding.lookup(input_ids).astype(self.float_dtype) if self.embeds else None
        feeds = io_spec.model_feeds(input_ids, past, layout=self.layout, embeds=embeds)
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]
