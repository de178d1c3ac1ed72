"""How well the sweep's cheap estimates rank (block, format) against the full measurement.

    python benchmarks/sweep_estimates.py MODEL [--target jetson] [--windows 8] [--seqlen 512]
                                        [--calib-text FILE] [--blocks N] [--table]

For every block and every candidate format of the target, the block's transform is found as the
sweep finds it (map search, map off, quantizers of ``--quantizers``) and then scored four ways:

- full: the block transformed, every later block and the logits run (dCE, KL): what the sweep
  measured before issue 25, O(L) block forwards per measurement;
- fisher: dCE and KL predicted from the fp model's output gradients (``qublast.fisher``): one
  block forward per measurement, plus one forward and backward pass of the model for all;
- block error: relative MSE of the block's output (``block_err``), no later block;

and with ``--table`` the embedding table's rows (every table format) full and fisher (the
gradient at block 0's input);

and prints, per format and over all rows, Spearman's rank correlation of each estimate with the
full KL and dCE, and the seconds each way. Nothing is written.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    from qublast.blocks import BlockRunner
    from qublast.fisher import output_gradients
    from qublast.formats import get_format, get_target
    from qublast.mapsearch import search_transform
    from qublast.models import load_model, resolve_source
    from qublast.sensitivity import _Estimated, _score
    from qublast.text import calib_text, calib_windows, tokenize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--target", default="jetson")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-text", default=str(Path(__file__).resolve().parents[2] / "shared/assets/wikitext-2/wiki.valid.calib.txt"))
    p.add_argument("--blocks", type=int, help="only the first N blocks")
    p.add_argument("--threads", type=int)
    p.add_argument("--table", action="store_true", help="also the embedding table's rows (every table format), full vs fisher")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = get_target(args.target)
    formats = [f for f in target.candidates if f != "fp16"]
    model, tokenizer, spec = load_model(resolve_source(args.model))
    ids = tokenize(tokenizer, calib_text(path=args.calib_text).text)
    (sens,) = calib_windows(ids, args.seqlen, (args.windows,), seed=0)
    started = time.perf_counter()
    runner = BlockRunner(model, spec, torch.from_numpy(sens))
    print(f"runner (fp pass) {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    grads = output_gradients(runner)
    grad_s = time.perf_counter() - started
    print(f"output gradients {grad_s:.1f} s", flush=True)
    rows = []
    full_s = fisher_s = search_s = 0.0
    hidden = runner.first_hidden
    blocks = len(runner.layers) if args.blocks is None else min(args.blocks, len(runner.layers))
    for index in range(blocks):
        out_fp = runner.run_block(index, hidden)
        estimated = _Estimated(runner, index, hidden, out_fp, grads)
        for name in formats:
            started = time.perf_counter()
            (_mapped, _), (t, err) = search_transform(runner, index, hidden, get_format(name, target), scaling=False,
                                                      range_method="mse")
            search_s += time.perf_counter() - started
            started = time.perf_counter()
            full = _score(runner, index, hidden, t)
            full_s += time.perf_counter() - started
            started = time.perf_counter()
            est = estimated(t)
            fisher_s += time.perf_counter() - started
            row = (index, name, full.ce - runner.fp_score.ce, full.kl, est.ce - runner.fp_score.ce, est.kl, err)
            rows.append(row)
            print("block {:>2} {:>4}: full dCE {:+.5f} KL {:.5f} | fisher dCE {:+.5f} KL {:.5f} | block err {:.4g}".format(*row),
                  flush=True)
        hidden = out_fp
    print(f"\n{args.model}, target {args.target}, {args.windows} windows of {args.seqlen}, {blocks} blocks, RTN map off")
    print("| rows | Spearman: fisher KL ~ full KL | fisher dCE ~ full dCE | block err ~ full KL | block err ~ full dCE |")
    print("|---|---|---|---|---|")
    for label, keep in [*((f, lambda r, f=f: r[1] == f) for f in formats), ("all", lambda r: True)]:
        sel = [r for r in rows if keep(r)]
        cols = [np.array([r[k] for r in sel]) for k in range(2, 7)]
        dce, kl, edce, ekl, err = cols
        print(f"| {label} ({len(sel)}) | {spearman(ekl, kl):.3f} | {spearman(edce, dce):.3f} | {spearman(err, kl):.3f} "
              f"| {spearman(err, dce):.3f} |")
    if args.table:
        from qublast.formats import EMBED_FORMATS, embed_format
        from qublast.sensitivity import _estimate_table
        from qublast.vocab import VocabTransform, score_vocab
        print("\n| table format | full dCE | full KL | fisher dCE | fisher KL | fisher / full KL | seconds full | fisher |")
        print("|---|---|---|---|---|---|---|---|")
        for name in (f for f in EMBED_FORMATS if f != "fp16"):
            started = time.perf_counter()
            full = score_vocab(runner, VocabTransform(embed_format(name), get_format("fp16", target)), unit="embed")
            table_full_s = time.perf_counter() - started
            started = time.perf_counter()
            est = _estimate_table(runner, name, grads)
            table_est_s = time.perf_counter() - started
            dce = full.ce - runner.fp_score.ce
            print(f"| {name} | {dce:+.5f} | {full.kl:.5f} | {est.dce:+.5f} | {est.kl:.5f} | {est.kl / max(full.kl, 1e-12):.3f} "
                  f"| {table_full_s:.1f} | {table_est_s:.2f} |", flush=True)
    print(f"\nseconds: full scoring {full_s:.1f} ({full_s / len(rows):.2f} per row); fisher {grad_s:.1f} once + "
          f"{fisher_s:.1f} ({fisher_s / len(rows):.3f} per row); transform search {search_s:.1f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
