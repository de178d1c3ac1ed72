"""Probe: what zero points (asymmetric INT4) would buy over symmetric INT4 on a checkpoint.

Every block linear is quantized by round-to-nearest at the block size QuBLAST's CPU ``w4`` takes
for it (the largest of 128/64/32/16 dividing its input), either symmetric (codes -8..7, one scale
a block, as ``w4``) or asymmetric (codes 0..15, a scale and a zero point a block, as ONNX
Runtime's MatMulNBits with zero points), each with a clip search minimising the block's weight
MSE over the same 21 ratios; embeddings and lm_head stay fp. With ``--calib-text`` each grid is
also filled by GPTQ (static groups, columns by decreasing Hessian diagonal, as ``qublast.gptq``;
Hessians from the fp model's inputs on calibration windows, not propagated through quantized
blocks). With ``--rotation hadamard`` the residual stream is first rotated (QuaRot-style, folded
into the weights exactly, no graph change: ``benchmarks.rotation_probe``) and every grid is fitted
in the rotated basis. Prints the weight relative error and the PyTorch perplexity of each on the first
windows of the evaluation text. No scaling map: it compares the two grids alone, to decide whether
an asymmetric format is worth building (issue 28 asks for it to be judged on the de-gridded copy).

    python -m benchmarks.asym_probe --model /tmp/dg/smollm2-degridded --eval-text wiki.test.raw \
        [--calib-text wiki.valid.calib.txt] [--rotation hadamard] [--grids symmetric]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from qublast.errors import QublastError
from qublast.evaluate import perplexity
from qublast.gptq import DAMP, gptq_quantize
from qublast.models import load_model, resolve_source
from qublast.quant import CLIP_GRID, quantize_weight
from qublast.text import calib_text, calib_windows, eval_text, eval_windows, tokenize

BLOCKS = (128, 64, 32, 16)  # CPU w4's block sizes, largest first
LEVELS = 15  # 4-bit codes 0..15


def block_for(in_features: int) -> int:
    """The block CPU ``w4`` takes for an input of ``in_features``: the largest of ``BLOCKS`` dividing it."""
    for block in BLOCKS:
        if in_features % block == 0:
            return block
    raise ValueError(f"no INT4 block size of {BLOCKS} divides an input of {in_features}")


def asymmetric_grid(w: torch.Tensor, block: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [out, G, 1] of ``w`` [out, in]: per block, codes 0..15 on [lo, hi] (zero
    included) shrunk by the clip ratio with the lower weight MSE (weighted per input column by
    ``importance`` [in], as ``quantize_weight``); scales fp16, zero points integers."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // block, block)
    weight = 1.0 if importance is None else importance.float().reshape(1, in_f // block, block)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    best = best_err = None
    for ratio in CLIP_GRID:
        scale = ((hi - lo) * ratio / LEVELS).clamp(min=1e-8).half().float()
        zero = torch.round(-lo * ratio / scale).clamp(0, LEVELS)
        deq = (torch.clamp(torch.round(g / scale) + zero, 0, LEVELS) - zero) * scale
        err = ((deq - g).pow(2) * weight).sum(-1, keepdim=True)
        if best is None:
            best, best_err = (scale, zero), err
        else:
            better = err < best_err
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
            best_err = torch.where(better, err, best_err)
    return best


def asymmetric(w: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized asymmetric INT4 of ``w`` [out, in]: round-to-nearest on ``asymmetric_grid``, or,
    given the inputs' Hessian ``h`` [in, in], GPTQ on that grid (static groups, act order)."""
    out_f, in_f = w.shape
    scale, zero = asymmetric_grid(w, block, None if h is None else torch.diag(h))  # GPTQ: activation-aware, as symmetric
    if h is None:
        g = w.float().reshape(out_f, in_f // block, block)
        return ((torch.clamp(torch.round(g / scale) + zero, 0, LEVELS) - zero) * scale).reshape(out_f, in_f)
    scale, zero = scale[..., 0], zero[..., 0]  # [out, G]
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    h = h[order][:, order]
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    work = w.float().clone()
    work[:, dead] = 0.0
    work = work[:, order]
    out = torch.empty_like(work)
    for i, col in enumerate(order.tolist()):
        s, z = scale[:, col // block], zero[:, col // block]
        deq = (torch.clamp(torch.round(work[:, i] / s) + z, 0, LEVELS) - z) * s
        out[:, i] = deq
        err = (work[:, i] - deq) / hinv[i, i]
        work[:, i:].addr_(err, hinv[i, i:], alpha=-1.0)
    result = torch.empty_like(out)
    result[:, order] = out
    return result


def symmetric(w: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    if h is None:
        return quantize_weight(w, bits=4, block_size=block).dequantize()
    return gptq_quantize(w, h, bits=4, block_size=block, act_order=True).dequantize()


@torch.no_grad()
def hessians(model, linears, windows) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` of every linear's input over ``windows`` [M, S] (float64 sums)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in linears:
        def hook(_m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
        handles.append(m.register_forward_pre_hook(hook))
    try:
        for start in range(0, len(windows), 2):
            model(input_ids=torch.from_numpy(windows[start:start + 2]).long(), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = windows.size
    return {name: (total * (2.0 / tokens)).float() for name, total in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--calib-text", help="also compare the grids filled by GPTQ, fitted on this text")
    ap.add_argument("--gptq-windows", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rotation", choices=("none", "hadamard", "random"), default="none",
                    help="rotate the residual stream first (folded into the weights)")
    ap.add_argument("--grids", choices=("both", "symmetric", "asymmetric"), default="both")
    args = ap.parse_args()
    for flag, path in (("--eval-text", args.eval_text), ("--calib-text", args.calib_text)):
        if path is not None and not Path(path).is_file():
            print(f"asym_probe: error: {flag} {path}: no such file", file=sys.stderr)
            sys.exit(2)
    if min(args.windows, args.gptq_windows, args.seqlen) < 1:
        print("asym_probe: error: --windows, --gptq-windows and --seqlen must be at least 1", file=sys.stderr)
        sys.exit(2)
    try:
        model, tokenizer, spec = load_model(resolve_source(args.model))
    except QublastError as exc:
        print(f"asym_probe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.rotation != "none":
        if spec.name not in ("llama", "mistral", "qwen2"):
            print(f"asym_probe: error: --rotation needs a plain Llama-family model, not {spec.name}", file=sys.stderr)
            sys.exit(2)
        from benchmarks.rotation_probe import rotate, rotation

        head = model.get_submodule(spec.lm_head)
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied from the table
        rotate(model, spec, rotation(args.rotation, model.config.hidden_size))
    windows = eval_windows(tokenize(tokenizer, eval_text(path=args.eval_text).text), args.seqlen, max_windows=args.windows)
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith(spec.blocks + ".")]
    fp = {name: m.weight.detach().clone() for name, m in linears}
    started = time.perf_counter()
    base = perplexity(model, windows, desc="ppl fp").ppl
    print(f"fp (rotation {args.rotation}): PPL {base:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    grids = [("symmetric", symmetric), ("asymmetric", asymmetric)]
    grids = [(label, fn) for label, fn in grids if args.grids in ("both", label)]
    runs = [(f"{label} RTN", fn, None) for label, fn in grids]
    if args.calib_text:
        started = time.perf_counter()
        ids = tokenize(tokenizer, calib_text(path=args.calib_text).text)
        hs = hessians(model, linears, calib_windows(ids, args.seqlen, (args.gptq_windows,), seed=0)[0])
        print(f"Hessians on {args.gptq_windows} calibration windows ({time.perf_counter() - started:.0f} s)", flush=True)
        runs += [(f"{label} GPTQ", fn, hs) for label, fn in grids]
    for label, quantize, hs_ in runs:
        num = den = 0.0
        started = time.perf_counter()
        with torch.no_grad():
            for name, m in linears:
                deq = quantize(fp[name], block_for(m.in_features), None if hs_ is None else hs_[name])
                num += float((deq - fp[name]).pow(2).sum())
                den += float(fp[name].pow(2).sum())
                m.weight.copy_(deq)
        ppl = perplexity(model, windows, desc=f"ppl {label}").ppl
        print(f"{label}: weight rel. error {math.sqrt(num / den):.4f}, PPL {ppl:.4f} ({ppl / base - 1:+.2%}; "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
        with torch.no_grad():
            for name, m in linears:
                m.weight.copy_(fp[name])


if __name__ == "__main__":
    main()
