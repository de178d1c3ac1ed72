"""Perplexity through the deployed graph: PPL = exp(mean NLL over predicted tokens) (no torch).

``python -m runtime.perplexity --bundle DIR --text FILE [--backend ort|trt]`` follows the
evaluation protocol of DESIGN.md: the file's lines as WikiText rows (blank -> "", else the
line with its newline) joined with "\n\n", tokenized once, non-overlapping windows of the
recipe's sequence length, each scored as one prefill. With ``--against REF`` (another bundle of
the same model, e.g. its fp32 graph) both are scored on the same windows and the paired
difference of their mean NLL per window is reported with its standard error: how far a PPL
increase is resolved by the text's window count.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from .bundle import BundleError, open_bundle
from .generate import INTERRUPTED, check_threads


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed NLL of ``ids[1:]`` under ``logits[:-1]`` for one window ([S, V], [S])."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexity(model, windows: np.ndarray, *, progress: bool = True) -> dict:
    """Score each window [seqlen] as one prefill; returns ppl, nll_sum, tokens, seconds and
    window_nll (the summed NLL of each window, in order)."""
    nll_sum, tokens, start, per_window = 0.0, 0, time.perf_counter(), []
    for k, window in enumerate(windows):
        logits, _ = model.forward(window[None, :])
        per_window.append(window_nll(logits[0], window))
        nll_sum += per_window[-1]
        tokens += len(window) - 1
        if progress:
            rate = (k + 1) / (time.perf_counter() - start)
            print(f"\rppl ort: {k + 1}/{len(windows)} windows ({rate:.2f}/s) ppl {math.exp(nll_sum / tokens):.4f}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, "seconds": time.perf_counter() - start,
            "window_nll": per_window}


def paired_shift(after, before) -> tuple[float, float]:
    """dCE of paired per-window cross-entropies (nats a token, ``after`` minus ``before`` on the same
    windows) and its standard error over the windows (tokens inside one correlate); inf with one."""
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)  # [windows] each
    if after.shape != before.shape or after.ndim != 1 or after.size == 0:
        raise ValueError(f"paired windows need the same non-zero count, got {after.shape} and {before.shape}")
    diff = after - before
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf


def wikitext_rows_to_text(lines: list[str]) -> str:
    """The WikiText protocol's text (the one implementation; ``qublast.text`` uses it): rows as the
    HF loader gives them (blank -> "", else line + "\\n"), joined with "\\n\\n"."""
    return "\n\n".join("" if not line.strip() else line.rstrip("\n") + "\n" for line in lines)


def wikitext_text(path: str | Path) -> str:
    """The evaluation text of a WikiText raw file (``wikitext_rows_to_text`` of its lines)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file is not UTF-8: {path} (byte {exc.start})") from None
    return wikitext_rows_to_text(lines)


def windows(ids: list[int], seqlen: int, *, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows from the start: int64 [N, seqlen]; the short tail is dropped (the
    one implementation; ``qublast.text.eval_windows`` uses it)."""
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return np.asarray(ids[: n * seqlen], dtype=np.int64).reshape(n, seqlen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.perplexity", description="Perplexity of a text through a QuBLAST bundle.")
    p.add_argument("--bundle", required=True)
    p.add_argument("--text", required=True, help="WikiText raw layout file (e.g. wiki.test.raw)")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort")
    p.add_argument("--seqlen", type=int, help="window length (default: the recipe's)")
    p.add_argument("--max-windows", type=int, help="default: the recipe's evaluation window count")
    p.add_argument("--threads", type=int)
    p.add_argument("--against", metavar="REF", help="a reference bundle of the same model (e.g. its fp32 graph), scored on the "
                   "same windows: prints the paired dCE per token and its standard error over the windows")
    args = p.parse_args(argv)
    try:
        if args.seqlen is not None and args.seqlen < 2:
            raise ValueError(f"--seqlen must be >= 2, got {args.seqlen}")
        if args.max_windows is not None and args.max_windows < 1:
            raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
        check_threads(args.threads)
        if not args.text.strip() or not Path(args.text).is_file():
            raise ValueError(f"--text {args.text!r} is {'a folder' if Path(args.text).is_dir() and args.text.strip() else 'not a file'}")
        bundle = open_bundle(args.bundle, backend=args.backend, threads=args.threads)
        reference = open_bundle(args.against, threads=args.threads) if args.against else None  # checked before any scoring
        seqlen = args.seqlen or bundle.recipe["metrics"]["seqlen"]
        bundle.check_length(seqlen, f"--seqlen {seqlen}")
        if reference is not None:
            reference.check_length(seqlen, f"--seqlen {seqlen} (--against)")
        limit = args.max_windows or bundle.recipe.get("evaluation", {}).get("windows")
        ids = bundle.tokenizer.encode(wikitext_text(args.text), add_special_tokens=False).ids
        try:
            chunks = windows(ids, seqlen, max_windows=limit)
        except ValueError as exc:
            raise ValueError(f"--text {args.text}: {exc}") from None
        if reference is not None and reference.tokenizer.encode(wikitext_text(args.text), add_special_tokens=False).ids != ids:
            raise ValueError(f"--against {args.against}: its tokenizer splits the text differently (another model?)")
        result = perplexity(bundle.model, chunks)
        ref = perplexity(reference.model, chunks) if reference is not None else None
    except (BundleError, ValueError, RuntimeError, OSError) as exc:  # RuntimeError: TensorRT/CUDA unavailable or failing
        print(f"qublast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qublast: error: {INTERRUPTED}", file=sys.stderr)
        return 130
    recorded = bundle.recipe["metrics"].get("ppl_quant_ort")
    print(f"PPL {result['ppl']:.4f} over {result['tokens']} predicted tokens ({result['seconds']:.1f} s, backend {args.backend})")
    if recorded:
        print(f"recipe's ONNX Runtime PPL {recorded:.4f} ({100 * (result['ppl'] / recorded - 1):+.4f}%)")
    if ref is not None:
        dce, stderr = paired_shift(np.asarray(result["window_nll"]) / (seqlen - 1), np.asarray(ref["window_nll"]) / (seqlen - 1))
        spread = f"standard error {stderr:.5f}" if math.isfinite(stderr) else "no standard error (one window)"
        print(f"against {args.against}: PPL {ref['ppl']:.4f}; paired over {len(chunks)} windows: dCE {dce:.5f} nats a token, "
              f"{spread} (PPL {100 * math.expm1(dce):+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
