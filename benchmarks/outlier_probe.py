"""Does CBQ's coarse-to-fine outlier preprocessing (CFP) pay on top of the scaling map?

    python benchmarks/outlier_probe.py MODEL [--target jetson] [--formats w4] [--windows 8]
                                       [--calib-text FILE] [--blocks N]

CFP (CBQ, Ding et al. 2023, section 3.3) finds outliers in two steps: coarse, the values above
Q3 + 1.5 IQR of the tensor's magnitudes; fine, the split of that set (sorted) that maximises the
squared distance between the two parts' means less the sum of their variances, the upper part
being the outliers. Activations: the outlier input channels (by max |x| on the search tokens) are
scaled down to the largest ordinary channel, the factor folded into the weight columns, as the
map folds its scales. Weights: each linear's outlier entries (by |w|, per output row) are
truncated to the row's largest ordinary entry before quantization.

For every block and format the map is searched as the sweep searches it (``search_transform``,
round to nearest), then CFP is tried the way the map tries its alphas (one candidate at a time,
scored on the block's output, kept only where it lowers it):

- per foldable group: CFP's activation scales at exponent 0.5 and 1, alone and times the map's
  scales for that group;
- the weight truncation of every linear, on top of the best so far.

Printed per row: the block output error with the map, with map + CFP and which candidates won,
and the end-to-end KL and dCE of both predicted from the fp model's output gradients
(``qublast.fisher``, the sweep's estimate) with the full clip grid. The totals estimate what CFP
changes for a uniform plan in that format. Nothing is written.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IQR_K = 1.5
BETAS = (0.5, 1.0)


def cfp_outliers(values: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the outliers of ``values`` (magnitudes, 1-D): quartile rule, then the
    split of the coarse set with the largest between-part distance less within-part variance."""
    v = values.float()
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=v.dtype))
    coarse = v > q3 + IQR_K * (q3 - q1)
    if int(coarse.sum()) < 2:
        return coarse
    sorted_v, _ = v[coarse].sort()
    best, threshold = -float("inf"), float(sorted_v[0])
    for k in range(1, sorted_v.numel()):
        low, high = sorted_v[:k], sorted_v[k:]
        score = float((high.mean() - low.mean()) ** 2 - low.var(unbiased=False) - high.var(unbiased=False))
        if score > best:
            best, threshold = score, float(sorted_v[k])
    return v >= threshold


def cfp_scales(x_absmax: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-channel factors s [in] (x / s): the outlier channels brought down towards the largest
    ordinary channel, (max|x_j| / ordinary max)^beta; 1 elsewhere."""
    mask = cfp_outliers(x_absmax)
    s = torch.ones_like(x_absmax, dtype=torch.float32)
    if not mask.any() or mask.all():
        return s
    ordinary = float(x_absmax[~mask].max().clamp(min=1e-8))
    s[mask] = (x_absmax[mask].float() / ordinary).pow(beta)
    return s


def truncate_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row's CFP outlier entries (by |w|) clipped to the row's largest ordinary entry."""
    out = w.clone()
    for r in range(w.shape[0]):
        mag = w[r].abs()
        mask = cfp_outliers(mag)
        if mask.any() and not mask.all():
            limit = mag[~mask].max()
            out[r] = w[r].clamp(-limit, limit)
    return out


def main() -> int:
    from qublast.apply import QuantMemo, fold_block, restored, transform_block
    from qublast.blocks import BlockRunner, foldable, get_module
    from qublast.fisher import output_gradients
    from qublast.formats import get_format, get_target
    from qublast.mapsearch import SEARCH_CLIP_GRID, importance, input_samples, search_transform, search_windows
    from qublast.models import load_model, resolve_source
    from qublast.quant import CLIP_GRID
    from qublast.text import calib_text, calib_windows, tokenize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--target", default="jetson")
    p.add_argument("--formats", help="comma-separated (default: the target's quantized candidates)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-text", default=str(Path(__file__).resolve().parents[2] / "shared/assets/wikitext-2/wiki.valid.calib.txt"))
    p.add_argument("--blocks", type=int, help="only the first N blocks")
    args = p.parse_args()
    target = get_target(args.target)
    formats = args.formats.split(",") if args.formats else [f for f in target.candidates if f != "fp16"]
    for name in formats:  # unknown names fail before the model loads
        if get_format(name, target).act == "static":
            p.error(f"{name}: static activation ranges would need measuring again after CFP's folds; weight-only formats only")
    model, tokenizer, spec = load_model(resolve_source(args.model))
    ids = tokenize(tokenizer, calib_text(path=args.calib_text).text)
    (windows,) = calib_windows(ids, args.seqlen, (args.windows,), seed=0)
    runner = BlockRunner(model, spec, torch.from_numpy(windows))
    started = time.perf_counter()
    grads = output_gradients(runner)
    print(f"output gradients {time.perf_counter() - started:.1f} s", flush=True)

    totals = {name: [0.0, 0.0, 0.0, 0.0, 0] for name in formats}  # kl map, kl cfp, dce map, dce cfp, rows won
    hidden = runner.first_hidden
    blocks = len(runner.layers) if args.blocks is None else min(args.blocks, len(runner.layers))
    started = time.perf_counter()
    for index in range(blocks):
        block = runner.layers[index]
        out_fp = runner.run_block(index, hidden)
        search = search_windows(hidden)
        ref = runner.run_block(index, search)
        ref_norm = max(ref.pow(2).mean().item(), 1e-12)
        inputs = input_samples(runner, index, search, spec.linears)
        producers = [g for g in spec.groups if g.producer and foldable(get_module(block, g.producer))]

        def run(t, truncate: bool, windows, clip_grid, memo=None):
            with restored(block):
                fold_block(block, spec, t.smooth)
                if truncate:
                    for name in spec.linears:
                        lin = get_module(block, name)
                        lin.weight.data.copy_(truncate_rows(lin.weight.data.float()).to(lin.weight.dtype))
                transform_block(block, spec, replace(t, smooth={}), clip_grid=clip_grid, memo=memo)
                return runner.run_block(index, windows)

        for name in formats:
            fmt = get_format(name, target)
            (mapped, map_err), _ = search_transform(runner, index, hidden, fmt, scaling=True, range_method="mse")
            memo = QuantMemo()

            def err(t, truncate=False):
                return (run(t, truncate, search, SEARCH_CLIP_GRID, memo) - ref).pow(2).mean().item() / ref_norm

            best, best_err, truncate, won = mapped, map_err, False, []
            for group in producers:
                x_absmax = inputs[group.linears[0]].abs().amax(dim=0)
                base = best.smooth.get(group.producer)
                for beta in BETAS:
                    for combined in (False, True):
                        if combined and base is None:
                            continue
                        s = cfp_scales(x_absmax, beta)
                        if combined:
                            s = s * base.float()
                        smooth = {**best.smooth, group.producer: s}
                        t = replace(best, smooth=smooth, importance=importance(spec, inputs, smooth))
                        e = err(t)
                        if e < best_err:
                            best, best_err = t, e
                            won = [w for w in won if not w.startswith(group.producer)] + [
                                f"{group.producer}:b{beta}{'xmap' if combined else ''}"]
            e = err(best, truncate=True)
            if e < best_err:
                best_err, truncate = e, True
                won.append("truncate")

            def estimate(t, trunc):
                return grads.estimate(index, run(t, trunc, hidden, CLIP_GRID) - out_fp)

            dce_map, kl_map = estimate(mapped, False)
            dce_cfp, kl_cfp = (dce_map, kl_map) if best is mapped and not truncate else estimate(best, truncate)
            row = totals[name]
            row[0] += kl_map
            row[1] += kl_cfp
            row[2] += dce_map
            row[3] += dce_cfp
            row[4] += bool(won)
            print(f"block {index:>2} {name:>4}: block err map {map_err:.4g} -> map+CFP {best_err:.4g} "
                  f"({100 * (best_err / max(map_err, 1e-12) - 1):+.1f}%) | est. KL {kl_map:.5f} -> {kl_cfp:.5f}, "
                  f"dCE {dce_map:+.5f} -> {dce_cfp:+.5f} | won: {', '.join(won) or '-'}", flush=True)
        hidden = out_fp
    print(f"\n{args.model}, target {args.target}, {args.windows} windows of {args.seqlen}, {blocks} blocks, "
          f"round to nearest, {time.perf_counter() - started:.0f} s")
    print("| format | rows CFP won | est. KL map | est. KL map+CFP | est. dCE map | est. dCE map+CFP |")
    print("|---|---|---|---|---|---|")
    for name, (kl_map, kl_cfp, dce_map, dce_cfp, won) in totals.items():
        print(f"| {name} | {won} of {blocks} | {kl_map:.5f} | {kl_cfp:.5f} | {dce_map:+.5f} | {dce_cfp:+.5f} |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
