"""Activation scaling map: per-channel scales folded into norms, and static activation ranges.

Pure functions over tensors (DESIGN.md "Activation scaling map"):

- ``smooth_scales``: s_j = max|X_j|^a / max|W_.j|^(1-a) (SmoothQuant, for ``w8a8``) or
  s_j = mean|X_j|^a (activation-aware, for weight-only formats), normalised to geometric
  mean 1; a = 0 gives s = 1 (no scaling).
- ``fold_into_norm`` / ``fold_into_rows``: X' = X / s by dividing the producing norm's weight
  or a producing linear's output rows and bias; ``scale_columns``: W' = W * s on the
  consuming linears' input columns, so X' W'^T = X W^T exactly before quantization.
- ``absmax_range`` / ``percentile_range`` / ``mse_range``: a symmetric per-tensor INT8 range.
"""
from __future__ import annotations

import torch

ALPHA_GRID: tuple[float, ...] = tuple(round(0.2 * i, 1) for i in range(6))
RANGE_METHODS = ("absmax", "percentile", "mse")
_EPS = 1e-8


def smooth_scales(act_stat: torch.Tensor, weight_absmax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Per-input-channel scales [in] from activation statistics [in] (and weight column absmax [in])."""
    a = act_stat.float().clamp(min=_EPS).pow(alpha)
    if weight_absmax is not None:
        a = a / weight_absmax.float().clamp(min=_EPS).pow(1 - alpha)
    s = a / a.log().mean().exp()  # geometric mean 1 keeps magnitudes where they were
    return s.clamp(min=1e-4, max=1e4)


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor, *, norm_offset: float = 0.0) -> torch.Tensor:
    """The producer's side when it is a norm: its output X becomes X / s.

    The norm multiplies by (offset + weight) (offset 1 for Gemma), so the new weight is
    (offset + weight) / s - offset.
    """
    return (norm_offset + norm_weight.float()) / s - norm_offset


def scale_columns(linear_weights: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor]:
    """The consumers' side of a fold: every input column j multiplied by s_j."""
    return [w.float() * s.unsqueeze(0) for w in linear_weights]


def fold_into_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The producer's side when it is a linear: output row j (and bias j) divided by s_j.

    Per-output-channel and row-wise block quantization of that producer absorb the row scale,
    so the fold costs it nothing."""
    new_bias = None if bias is None else bias.float() / s
    return weight.float() / s.unsqueeze(1), new_bias


def absmax_range(x: torch.Tensor) -> float:
    """max |x|: no clipping."""
    return float(x.abs().max())


def percentile_range(x: torch.Tensor, *, q: float = 99.99) -> float:
    """The q-th percentile of |x| (values above it are clipped)."""
    flat = x.abs().flatten().float()
    k = max(1, min(flat.numel(), int(round(flat.numel() * q / 100))))
    return float(flat.kthvalue(k).values)


MSE_SAMPLE = 1 << 18


def mse_range(x: torch.Tensor, *, bits: int = 8, grid: int = 40) -> float:
    """The clip range in (0, absmax] minimising the mean squared INT-``bits`` quantization error.

    Large tensors are scored on an evenly strided sample of ~2^18 values plus their absmax value.
    """
    xf = x.flatten().float()
    top = xf.abs().max().item()
    if xf.numel() > MSE_SAMPLE:
        xf = torch.cat([xf[:: xf.numel() // MSE_SAMPLE], xf[xf.abs().argmax()].reshape(1)])
    if top == 0:
        return 0.0
    qmax = (1 << (bits - 1)) - 1
    best, best_err = top, float("inf")
    for i in range(grid):
        r = top * (1 - i / (grid + 1))
        err = (fake_quant(xf, r / qmax, bits=bits) - xf).pow(2).mean().item()
        if err < best_err:
            best, best_err = r, err
    return best


def act_range(x: torch.Tensor, method: str) -> float:
    """Range of ``x`` by a named estimator (see ``RANGE_METHODS``)."""
    if method == "absmax":
        return absmax_range(x)
    if method == "percentile":
        return percentile_range(x)
    if method == "mse":
        return mse_range(x)
    raise ValueError(f"unknown range method {method!r}; known: {', '.join(RANGE_METHODS)}")


def act_scale(range_: float, *, bits: int = 8) -> float:
    """Per-tensor scale for a symmetric range, rounded to an fp16 value (never 0)."""
    qmax = (1 << (bits - 1)) - 1
    scale = max(range_ / qmax, float(torch.finfo(torch.float16).tiny))
    return float(torch.tensor(scale).half().float())


def fake_quant(x: torch.Tensor, scale: float, *, bits: int = 8) -> torch.Tensor:
    """Symmetric per-tensor quantize-dequantize, as ONNX QuantizeLinear + DequantizeLinear compute it.
    Gradients pass straight through (only where autograd is recording: reconstruction)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    return straight_through(x, out)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` forward; while autograd records a graph through ``x``, the identity's gradient backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (quantized - x).detach()
    return quantized
