"""ONNX Runtime speed of bundles: prefill (512 tokens) and decode ms/token at 1 and 2 threads,
next to the memory-bandwidth bound measured in the same run (no torch).

    python benchmarks/ort_speed.py BUNDLE [BUNDLE ...] [--prefill 512] [--decode 32]

Bandwidth: a numpy copy of 512 MiB (bytes read + written / time, best of 3). Bound per decode
token: bytes of weights the graph reads (its external data file) + the KV cache, divided by
that bandwidth. Use a `--uniform fp16` bundle as the fp32 baseline (a graph with no Q/DQ).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import has_act_quant, verify  # noqa: E402
from runtime.session import OrtModel  # noqa: E402


def bandwidth_gbs(mib: int = 512) -> float:
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def time_bundle(path: Path, *, threads: int, prefill: int, decode: int, int8_fusion: bool) -> tuple[float, float]:
    model = OrtModel(str(path / "model.onnx"), threads=threads, int8_fusion=int8_fusion)
    ids = np.random.default_rng(0).integers(100, 1000, size=(1, prefill))
    model.forward(ids[:, :8])  # warm-up
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
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    args = p.parse_args()
    bw = bandwidth_gbs()
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s")
    print("| bundle | graph MB | ORT int8 fusion | threads | prefill ms | decode ms/token | bandwidth bound ms/token |")
    print("|---|---|---|---|---|---|---|")
    for path in args.bundles:
        recipe = verify(path)
        weights = sum(f.stat().st_size for f in path.glob("model.onnx*"))
        layers = recipe["model"]["num_blocks"]
        fusion = has_act_quant(recipe)  # speed runs use ORT's fused int8 kernels
        for threads in (1, 2):
            pre, dec = time_bundle(path, threads=threads, prefill=args.prefill, decode=args.decode, int8_fusion=True)
            model = OrtModel(str(path / "model.onnx"), threads=1)
            kv = 2 * layers * model.layout.kv_heads * model.layout.head_dim * 4 * (args.prefill + args.decode // 2)
            bound = 1e3 * (weights + kv) / (bw * 1e9)
            print(f"| {path.name} | {weights / 1e6:.0f} | {'yes' if fusion else 'n/a'} | {threads} | {pre:.0f} | {dec:.1f} | {bound:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
