"""Perplexity through the deployed graph: PPL = exp(mean NLL over predicted tokens) (no torch)."""
from __future__ import annotations

import math
import sys
import time

import numpy as np


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed NLL of ``ids[1:]`` under ``logits[:-1]`` for one window ([S, V], [S])."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexity(model, windows: np.ndarray, *, progress: bool = True) -> dict:
    """Score each window [seqlen] as one prefill; returns ppl, nll_sum, tokens, seconds."""
    nll_sum, tokens, start = 0.0, 0, time.perf_counter()
    for k, window in enumerate(windows):
        logits, _ = model.forward(window[None, :])
        nll_sum += window_nll(logits[0], window)
        tokens += len(window) - 1
        if progress:
            rate = (k + 1) / (time.perf_counter() - start)
            print(f"\rppl ort: {k + 1}/{len(windows)} windows ({rate:.2f}/s) ppl {math.exp(nll_sum / tokens):.4f}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, "seconds": time.perf_counter() - start}
