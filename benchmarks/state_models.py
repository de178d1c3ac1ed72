"""State-space and hybrid models at realistic shapes (random weights: no such checkpoint can be
downloaded here): the CLI makes a quantized bundle, then export time, graph size and ONNX Runtime
decode ms/token (and prefill tokens/s, a prefill being one step per token) are printed.

    python benchmarks/state_models.py OUT_DIR [--family mamba falcon_h1] [--target cpu] [--decode 16]

Shapes: Mamba-130m (hidden 768, 24 layers, state 16, vocab 50280) and Falcon-H1-0.5B (hidden 1024,
36 layers, 8 heads / 2 KV heads, Mamba-2 mixer d_ssm 1536 with 24 heads of 64, state 128, vocab
32784). The weights are random, so perplexities mean nothing; the point is that injection, the
state handling and the legality check work at scale, and what they cost. Calibration is cut to
the minimum (uniform w4, round to nearest, no map, two windows of 64 tokens).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(family: str):
    from transformers import FalconH1Config, MambaConfig

    if family == "mamba":
        return MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2, conv_kernel=4)
    return FalconH1Config(
        vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=36, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=128, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=128, tie_word_embeddings=False)


def save_model(family: str, folder: Path) -> int:
    """A seeded random model of ``family`` at full shape, with a small BPE tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from qublast.text import calib_text
    from tests.tiny import tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(family))
    model.save_pretrained(folder)
    tiny_tokenizer(calib_text().text).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def decode_speed(bundle: Path, *, threads: int, decode: int) -> tuple[float, float]:
    """(decode ms/token, prefill tokens/s) through the runtime, one thread."""
    from runtime.bundle import open_bundle

    model = open_bundle(bundle, threads=threads).model
    prompt = np.arange(5, 37, dtype=np.int64)[None]  # 32 tokens
    start = time.perf_counter()
    logits, past = model.forward(prompt)
    prefill = prompt.shape[1] / (time.perf_counter() - start)
    token = np.array([[int(logits[0, -1].argmax())]])
    start = time.perf_counter()
    for _ in range(decode):
        logits, past = model.forward(token, past)
        token = np.array([[int(logits[0, -1].argmax())]])
    return 1e3 * (time.perf_counter() - start) / decode, prefill


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--family", nargs="+", default=["mamba", "falcon_h1"])
    p.add_argument("--target", default="cpu")
    p.add_argument("--decode", type=int, default=16)
    args = p.parse_args()
    from qublast.export import main as export_main
    from qublast.recipe import read_recipe

    print("| model | target | params | export s | graph MB | host table MB | whole -% | decode ms/token (1 thread) | prefill tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.family:
        folder = args.out / f"{family}-model"
        params = save_model(family, folder)
        bundle = args.out / f"{family}-{args.target}"
        cli = ["--model", str(folder), "--target", args.target, "--uniform", "w4", "--quantizers", "rtn", "--no-scaling",
               "--reconstruct", "0", "--embeddings", "w8", "--lm-head", "w4", "--calib-seqlen", "64", "--calib-windows", "2",
               "--holdout-windows", "2", "--seqlen", "64", "--max-eval-windows", "2", "--context", "256",
               "--out", str(bundle), "--cache-dir", str(args.out / "cache")]
        if export_main(cli) != 0:
            print(f"| {family} | {args.target} | export failed |")
            continue
        m = read_recipe(bundle / "recipe.json")["metrics"]
        export_s = json.loads((bundle / "run.json").read_text())["timings"]["export_s"]
        graph = sum(f.stat().st_size for f in bundle.glob("model.onnx*")) / 1e6
        table = (bundle / "embedding.safetensors").stat().st_size / 1e6
        ms, tps = decode_speed(bundle, threads=1, decode=args.decode)
        print(f"| {family} ({config(family).hidden_size}, {config(family).num_hidden_layers} layers) | {args.target} | "
              f"{params / 1e6:.0f}M | {export_s:.0f} | {graph:.0f} | {table:.0f} | "
              f"{100 * (1 - m['size_bytes'] / m['size_bytes_fp16']):.1f} | {ms:.1f} | {tps:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
