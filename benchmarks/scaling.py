"""How calibration's two big costs grow from SmolLM2-135M's shape to an 8B model's (Llama-3-8B:
hidden 4096, MLP 14336, 32 heads / 8 KV heads, 32 blocks), measured on this machine.

    python benchmarks/scaling.py [--tokens 512] [--device cpu]

Prints, per shape: one decoder block's forward over ``--tokens`` tokens (random weights, fp32) and
GPTQ of the block's seven linears at INT4 (block 128, else 64) from a Hessian, each the best of two runs,
and the ratios 8B / SmolLM2. docs/results.md turns those ratios and SmolLM2's measured calibration
costs into the 8B estimate (how the sweep's work scales with the number of blocks is written there).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, intermediate, heads, kv heads
    "smollm2-135m": (576, 1536, 9, 3),
    "llama-3-8b": (4096, 14336, 32, 8),
}


def block(hidden: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "sdpa"
    return LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, tokens: int, device: str) -> dict[str, float]:
    from qublast.gptq import gptq_quantize, hessian

    hidden, intermediate, heads, kv = SHAPES[name]
    layer, rotary = block(hidden, intermediate, heads, kv)
    layer.to(device)
    x = torch.randn(1, tokens, hidden, device=device)
    positions = torch.arange(tokens, device=device)[None]
    embeddings = rotary(x, positions)
    with torch.no_grad():
        forward = best_of(2, lambda: layer(x, position_embeddings=embeddings, attention_mask=None))
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]

    def quantize_all():
        for linear in linears:
            inputs = torch.randn(tokens, linear.in_features, device=device)
            block_size = 128 if linear.in_features % 128 == 0 else 64  # as the Jetson target chooses
            gptq_quantize(linear.weight.data, hessian(inputs), bits=4, block_size=block_size, act_order=True)

    gptq = best_of(1 if name != "smollm2-135m" else 2, quantize_all)
    params = sum(p.numel() for p in layer.parameters())
    return {"params": params, "forward_s": forward, "gptq_s": gptq}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = {name: measure(name, args.tokens, args.device) for name in SHAPES}
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.tokens} tokens")
    print("| shape | block params | block forward s | GPTQ of the block's 7 linears s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params'] / 1e6:.1f} M | {r['forward_s']:.3f} | {r['gptq_s']:.2f} |")
    small, large = rows["smollm2-135m"], rows["llama-3-8b"]
    print(f"ratios 8B / SmolLM2 per block: params {large['params'] / small['params']:.1f}x, "
          f"forward {large['forward_s'] / small['forward_s']:.1f}x, GPTQ {large['gptq_s'] / small['gptq_s']:.1f}x")


if __name__ == "__main__":
    main()
