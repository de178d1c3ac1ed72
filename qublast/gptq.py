"""GPTQ: quantize a linear's weight column by column, pushing each column's rounding error onto
the columns not yet quantized so the layer's output on calibration inputs stays close
(Frantar et al., 2022). Pure functions over tensors; the deployed format is unchanged
(symmetric INT8 / INT4 codes with one scale per group along the input), only the codes and
scales differ from round-to-nearest.

    H = 2 X^T X / n   (X [n, in]: the linear's inputs)
    for each column j (in groups of ``block_size`` sharing one scale):
        q_j = quant(w_j);  e_j = (w_j - q_j) / [H^-1]_jj;  w_{>j} -= e_j [H^-1]_{j,>j}

with [H^-1] the upper Cholesky factor of the damped inverse. A group's scale is chosen when
the group begins, from the error-updated weights, by the same clip search as round-to-nearest
with the columns weighted by diag(H) (the inputs' mean square: activation-aware clipping).
With ``act_order`` the columns are visited by decreasing diag(H) while the groups stay the
contiguous blocks TensorRT and ONNX Runtime require ("static groups": scales from the
original weights).
"""
from __future__ import annotations

import torch

from .quant import CLIP_GRID, QuantizedWeight, _error_stats, dequantize, qrange, quantize_weight

DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal
LAZY_BATCH = 128  # columns updated together before the trailing matrix is touched


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` of inputs ``x`` [..., in], accumulated in fp32 (float64 for the sum): [in, in]."""
    flat = x.reshape(-1, x.shape[-1])
    flat = flat.float() if flat.device.type == "mps" else flat.double()
    return (2.0 / flat.shape[0] * flat.T @ flat).float()


class InverseFactors:
    """The column order and upper Cholesky factor of the damped inverse Hessian, kept per input
    Hessian: every format of a block quantizes the linears its map does not fold against the same
    unfolded Hessian, and q/k/v (gate/up) share one, so the factorisation (most of GPTQ's time on
    a wide input: 1.9 s of 2.0 for a 4864-wide down projection) is done once for all of them. A
    Hessian is found by identity or equal values; the result is the tensor a fresh factorisation
    of it gives."""

    def __init__(self):
        self._seen: list[tuple[torch.Tensor, tuple, tuple]] = []

    def get(self, h: torch.Tensor, key: tuple, compute):
        for seen, seen_key, value in self._seen:
            if seen_key == key and (seen is h or (seen.shape == h.shape and torch.equal(seen, h))):
                return value
        value = compute()
        self._seen.append((h, key, value))
        return value


def inverse_factor(h: torch.Tensor, *, damp: float, act_order: bool):
    """``(order, hinv, dead, importance)`` of Hessian ``h`` [in, in]: the visiting order of the columns,
    the upper Cholesky factor of the damped inverse in that order, the inputs that never fire, and
    diag(H) with those set to 1 (the columns' weights in the clip search)."""
    in_f = h.shape[0]
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    importance = torch.diag(h).clone()
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=h.device)
    h = h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return order, hinv, dead, importance


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, bits: int, block_size: int, damp: float = DAMP,
                  act_order: bool = False, clip_grid: tuple[float, ...] = CLIP_GRID,
                  factors: InverseFactors | None = None) -> QuantizedWeight:
    """GPTQ codes and scales of ``w`` [out, in] for inputs whose Hessian is ``h`` [in, in], computed on
    ``h``'s device; the result lives on ``w``'s. ``factors``: where to find (and keep) ``h``'s
    factorisation when other linears share ``h``."""
    home, w = w.device, w.to(h.device)
    out_f, in_f = w.shape
    if in_f % block_size:
        raise ValueError(f"block size {block_size} does not divide input size {in_f}")

    def factor():
        return inverse_factor(h, damp=damp, act_order=act_order)

    order, hinv, dead, importance = factor() if factors is None else factors.get(h, (damp, act_order), factor)
    original = w.detach().float()
    weights = original.clone()
    weights[:, dead] = 0.0
    scales = torch.zeros(out_f, in_f // block_size, device=weights.device)  # [out, G]
    if act_order:  # static groups: every scale from the original weights, then any column order
        scales = quantize_weight(weights, bits=bits, block_size=block_size, clip_grid=clip_grid, importance=importance).scale
    codes = _solve(weights[:, order], hinv, scales, order, bits=bits, block_size=block_size,
                   importance=importance[order], clip_grid=clip_grid, static=act_order)
    q = torch.empty_like(codes)
    q[:, order] = codes
    q = q.to(torch.int8)
    stats = _error_stats(original, dequantize(q, scales, block_size), torch.ones(1))
    return QuantizedWeight(q=q.to(home), scale=scales.to(home), bits=bits, block_size=block_size, stats=stats)


def _solve(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, order: torch.Tensor, *, bits: int, block_size: int,
           importance: torch.Tensor, clip_grid: tuple[float, ...], static: bool) -> torch.Tensor:
    """The column loop on ``w`` [out, in] (already in visiting order); fills ``scales`` when not
    ``static``; returns the codes [out, in] in visiting order. The loop runs once per column, so
    what does not change inside it (columns, pivots, static scales) is read out before it."""
    qmin, qmax = qrange(bits)
    out_f, in_f = w.shape
    codes = torch.zeros_like(w)
    columns, pivots = order.tolist(), torch.diagonal(hinv).tolist()
    for start in range(0, in_f, LAZY_BATCH):
        end = min(start + LAZY_BATCH, in_f)
        block, errors = w[:, start:end].clone(), torch.zeros(out_f, end - start, device=w.device)
        batch_scales = scales[:, [c // block_size for c in columns[start:end]]] if static else None  # [out, n]
        for i in range(end - start):
            col = columns[start + i]
            if static:
                scale = batch_scales[:, i]
            else:
                group = col // block_size
                if col % block_size == 0:  # a group begins (visiting order = column order)
                    span = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :block_size]  # [out, bs], error-updated
                    scales[:, group] = quantize_weight(span, bits=bits, block_size=block_size, clip_grid=clip_grid,
                                                       importance=importance[start + i:start + i + block_size]).scale[:, 0]
                scale = scales[:, group]
            column = block[:, i]
            q = torch.round(column / scale).clamp_(qmin, qmax)
            codes[:, start + i] = q
            err = (column - q * scale).div_(pivots[start + i])
            block[:, i:].addr_(err, hinv[start + i, start + i:end], alpha=-1.0)
            errors[:, i] = err
        w[:, end:].addmm_(errors, hinv[start:end, end:], alpha=-1.0)
    return codes
