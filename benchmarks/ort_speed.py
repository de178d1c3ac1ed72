"""ONNX Runtime speed of bundles, as the runtime opens them: prefill (512 tokens) and decode
ms/token at 1 and 2 threads, next to the memory-bandwidth bound measured in the same run (no torch).

    python benchmarks/ort_speed.py BASELINE BUNDLE [BUNDLE ...] [--prefill 512] [--decode 32] [--repeats 3]

Give the fp32 graph first (a ``--target cpu --uniform fp16 --embeddings fp16 --lm-head fp16``
bundle): every row's speed-up is against it at the same thread count. Each bundle runs with the
ONNX Runtime session options it records (its target's: accuracy level 4 on CPU, level 1 and no
fused integer kernels for the Jetson graph) and its host-side embedding table, if any.

Bandwidth: a numpy copy of 512 MiB (bytes read + written / time, best of 3). Bound per decode
token: the graph's weight bytes (``model.onnx`` + ``model.onnx.data``; a host-side table is
read one row per token) plus the KV cache at the graph's float size, over that bandwidth.

Each figure is the median of ``--repeats`` timed passes (prefill, then the decode steps after it),
so one slow pass on a shared machine does not decide a row. At each thread count every bundle
is open at once and the passes go round-robin over the bundles, so a slow spell of a shared
machine (this one's decode times drift by 20% within minutes) falls on every bundle alike
instead of on whichever row ran then.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import open_bundle  # noqa: E402


def bandwidth_gbs(mib: int = 512) -> float:
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def interleaved(models: list, *, prefill: int, decode: int, repeats: int, vocab: int = 1000) -> list[tuple[float, float]]:
    """(prefill ms, decode ms/token) per model, medians over ``repeats`` rounds; each round runs one
    pass (a prefill of ``prefill`` token ids drawn below ``vocab``, then ``decode`` greedy steps) of
    every model in turn."""
    for model in models:
        model.forward(np.array([[1, 2, 3, 4]]))  # warm-up
    passes: list[list[tuple[float, float]]] = [[] for _ in models]
    for _ in range(repeats):
        for model, done in zip(models, passes):
            done.append(_one_pass(model, prefill=prefill, decode=decode, vocab=vocab))
    return [(float(np.median([p for p, _ in done])), float(np.median([d for _, d in done]))) for done in passes]


def _one_pass(model, *, prefill: int, decode: int, vocab: int) -> tuple[float, float]:
    ids = np.random.default_rng(0).integers(vocab // 10, vocab, size=(1, prefill))
    start = time.perf_counter()
    logits, past = model.forward(ids)
    prefill_ms = 1e3 * (time.perf_counter() - start)
    token = np.array([[int(logits[0, -1].argmax())]])
    start = time.perf_counter()
    for _ in range(decode):
        logits, past = model.forward(token, past)
        token = np.array([[int(logits[0, -1].argmax())]])
    return prefill_ms, 1e3 * (time.perf_counter() - start) / decode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path, help="the fp32 graph's bundle first, then the others")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row; the median is printed")
    args = p.parse_args()
    bw = bandwidth_gbs()
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s; prefill {args.prefill} tokens, decode {args.decode} tokens "
          f"after it; median of {args.repeats} passes")
    print("| bundle | target | graph MB | host table MB | threads | prefill ms | decode ms/token | vs first | bound ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in (1, 2):
        bundles = [open_bundle(path, threads=threads) for path in args.bundles]
        timed = interleaved([b.model for b in bundles], prefill=args.prefill, decode=args.decode, repeats=args.repeats)
        baseline = timed[0][1]
        for path, bundle, (pre, dec) in zip(args.bundles, bundles, timed):
            graph = sum(f.stat().st_size for f in path.glob("model.onnx*"))
            table = path / "embedding.safetensors"
            table_mb = table.stat().st_size / 1e6 if table.is_file() else 0.0
            model = bundle.model
            itemsize = np.dtype(model.float_dtype).itemsize
            kv = 2 * model.layout.num_layers * model.layout.kv_heads * model.layout.head_dim * itemsize * (args.prefill + args.decode // 2)
            bound = 1e3 * (graph + kv) / (bw * 1e9)
            print(f"| {path.name} | {bundle.recipe['target']['name']} | {graph / 1e6:.0f} | {table_mb:.0f} | {threads} | {pre:.0f} | "
                  f"{dec:.1f} | {baseline / dec:.2f}x | {bound:.1f} |", flush=True)
        del bundles, timed
    return 0


if __name__ == "__main__":
    sys.exit(main())
