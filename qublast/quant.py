"""Quantization primitives: pure functions over tensors, each reporting its error.

A quantized weight is plain data: integer codes ``q`` (int8 storage, values within the
format's signed range), fp32 ``scale`` of shape ``[out, in // block_size]`` holding
fp16-representable values, and ``block_size``. ``dequantize`` gives ``q * scale`` exactly as
ONNX ``DequantizeLinear`` computes it, so PyTorch and the deployed graph agree bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

# Clip ratios tried per scale group; 1.0 is plain absmax.
CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(21))


@dataclass(frozen=True)
class QuantStats:
    """Error of one quantized tensor against its original."""

    rel_err: float  # ||W - Q(W)||_F / ||W||_F
    max_abs_err: float
    mse: float
    clip_mean: float  # mean chosen clip ratio (1.0 = absmax)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QuantizedWeight:
    """Symmetric integer weight: ``w ~= q * scale`` with one scale per group of ``block_size``."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, in // block_size]
    bits: int
    block_size: int
    stats: QuantStats

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in] weight as the deployed graph reconstructs it."""
        return dequantize(self.q, self.scale, self.block_size)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit code, e.g. (-8, 7) for 4 bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """``q * scale`` with each scale broadcast over its block: [out, in] fp32."""
    out_f, in_f = q.shape
    groups = q.float().view(out_f, in_f // block_size, block_size)  # [out, G, bs]
    return (groups * scale.unsqueeze(-1)).view(out_f, in_f)


def quantize_weight(
    w: torch.Tensor, *, bits: int, block_size: int, clip_grid: tuple[float, ...] = CLIP_GRID,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] symmetrically with a per-group clip search minimising MSE.

    ``importance`` [in] (mean x^2 of each input channel, from the scaling map) weights the
    squared error per input column, so the clip minimises the expected output error
    E[(x . (w - w_q))^2] over uncorrelated inputs instead of the weight error (AWQ-style
    activation-aware clipping). ``block_size == in`` gives per-output-channel scales. Scales
    are rounded to fp16 values so an fp16 deployment reproduces them exactly.
    """
    out_f, in_f = w.shape
    if in_f % block_size:
        raise ValueError(f"block size {block_size} does not divide input size {in_f}")
    qmin, qmax = qrange(bits)
    groups = w.detach().float().reshape(out_f, in_f // block_size, block_size)  # [out, G, bs]
    absmax = groups.abs().amax(dim=-1)  # [out, G]
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = torch.ones_like(absmax)
    best_ratio = torch.ones_like(absmax)
    weight = None if importance is None else importance.float().reshape(1, in_f // block_size, block_size)
    work = torch.empty_like(groups)  # one buffer for every ratio's codes and errors (the search is memory-bound)
    for ratio in clip_grid:
        scale = _fp16_scale(absmax * ratio / qmax).unsqueeze(-1)  # [out, G, 1]
        torch.div(groups, scale, out=work).round_().clamp_(qmin, qmax)  # codes
        work.mul_(scale).sub_(groups).square_()  # squared error of each weight
        if weight is not None:
            work.mul_(weight)
        err = work.sum(dim=-1)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale.squeeze(-1), best_scale)
        best_ratio.masked_fill_(better, ratio)
    q = torch.clamp(torch.round(groups / best_scale.unsqueeze(-1)), qmin, qmax)
    q = q.to(torch.int8).view(out_f, in_f)
    stats = _error_stats(w.detach().float(), dequantize(q, best_scale, block_size), best_ratio)
    return QuantizedWeight(q=q, scale=best_scale, bits=bits, block_size=block_size, stats=stats)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scale rounded to fp16, never zero (an all-zero group keeps scale 1)."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=float(torch.finfo(torch.float16).tiny))
    return scale.half().float()


def _error_stats(w: torch.Tensor, wq: torch.Tensor, ratio: torch.Tensor) -> QuantStats:
    diff = wq - w
    norm = w.norm().item()
    return QuantStats(
        rel_err=diff.norm().item() / norm if norm > 0 else 0.0,
        max_abs_err=diff.abs().max().item(),
        mse=diff.pow(2).mean().item(),
        clip_mean=ratio.mean().item(),
    )


def measured(qw: QuantizedWeight, w: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its error statistics measured against ``w`` [out, in] (codes made elsewhere, e.g. GPTQ)."""
    return replace(qw, stats=_error_stats(w.detach().float(), qw.dequantize(), torch.ones(1)))


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, *, bits: int, block_size: int) -> torch.Tensor:
    """Integer codes of ``w`` [out, in] for given scales [out, in // block_size]: int8 [out, in]."""
    out_f, in_f = w.shape
    if scale.shape != (out_f, in_f // block_size):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {tuple(w.shape)} / block {block_size}")
    qmin, qmax = qrange(bits)
    groups = w.detach().float().reshape(out_f, in_f // block_size, block_size)  # [out, G, bs]
    q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), qmin, qmax)
    return q.to(torch.int8).view(out_f, in_f)


def fake_quant_dynamic(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """INT8 quantize-dequantize of ``x`` [..., K] per row and per block of ``block_size`` along K,
    as ONNX Runtime's MatMulNBits computes its activation at accuracy level 4 (x86 MLAS):
    amax per block, codes round_half_even(x * (127 / amax)), values codes * (amax / 127).

    Checked bit for bit against ONNX Runtime 1.32's quantized codes (docs/ort-sources.md).
    """
    *lead, k = x.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the activation's last dimension {k}")
    blocks = x.float().reshape(*lead, k // block_size, block_size)  # [..., G, bs]
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # [..., G, 1]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv)  # torch.round rounds half to even
    out = (codes * (amax / 127.0)).reshape(x.shape).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:  # reconstruction: the gradient passes straight through
        return x + (out - x).detach()
    return out
