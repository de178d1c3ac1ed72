"""Does an offline rotation of the residual stream (QuaRot-style, folded into the weights, no
graph change) make a Llama-family model easier to quantize with the CPU target's formats?

    python benchmarks/rotation_probe.py --model M.gguf --eval-text wiki.test.raw [--windows 10] [--rotation hadamard]

The rotation Q [H, H] (orthogonal) is folded exactly: the RMSNorm weights move into the linears
that read them, readers of the residual stream get W Q, writers Q^T W, the embedding rows E Q,
lm_head W diag(g) Q, and RMSNorm(x Q) = RMSNorm(x) Q. ``hadamard`` uses a Walsh-Hadamard matrix
of the largest power of two dividing H, with random signs, Kronecker a random orthogonal factor
for the rest (576 = 64 x 9 for SmolLM2). ``random`` uses a random orthogonal matrix. ``none``
leaves the model as loaded; lm_head is untied from the table in every run so both can be
quantized alone. Round to nearest with the clip search, and the target's dynamic INT8
activations on the blocks' linears. Printed: PPL on the first ``--windows`` windows of 512.
With ``--calib-text``, also ``lm_head`` alone in w4 by GPTQ (act-order, Hessian of the final
norm's output on 16 calibration windows of 512), in the loaded basis and rotated.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qublast import text as qtext  # noqa: E402
from qublast.apply import quantize_linear  # noqa: E402
from qublast.blocks import blocks_of, get_module  # noqa: E402
from qublast.deployed import act_quantizers, set_act_quant  # noqa: E402
from qublast.evaluate import perplexity  # noqa: E402
from qublast.formats import get_format, get_target  # noqa: E402
from qublast.gptq import gptq_quantize, hessian  # noqa: E402
from qublast.models import load_model, resolve_source  # noqa: E402
from qublast.quant import quantize_weight  # noqa: E402

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def walsh_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def rotation(kind: str, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return random_orthogonal(size, g).float()
    power = size & -size  # the largest power of two dividing size
    signs = torch.where(torch.rand(size, generator=g) < 0.5, -1.0, 1.0).double()
    return (signs[:, None] * torch.kron(walsh_hadamard(power), random_orthogonal(size // power, g))).float()


@torch.no_grad()
def rotate(model, spec, q: torch.Tensor) -> None:
    def fold_norm(norm, linears):
        for lin in linears:
            lin.weight.mul_(norm.weight.float()[None, :])
        norm.weight.fill_(1.0)

    for layer in blocks_of(model, spec):
        fold_norm(layer.input_layernorm, [get_module(layer, n) for n in READERS[:3]])
        fold_norm(layer.post_attention_layernorm, [get_module(layer, n) for n in READERS[3:]])
        for name in READERS:
            lin = get_module(layer, name)
            lin.weight.copy_(lin.weight @ q)
        for name in WRITERS:
            lin = get_module(layer, name)
            lin.weight.copy_(q.T @ lin.weight)
    head, embed = get_module(model, spec.lm_head), get_module(model, spec.embed)
    fold_norm(get_module(model, spec.final_norm), [head])
    head.weight.copy_(head.weight @ q)
    embed.weight.copy_(embed.weight @ q)


@torch.no_grad()
def quantized_ppl(model, spec, windows, *, blocks=None, head=None, table=None) -> float:
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    layers = blocks_of(model, spec)
    for layer in layers if blocks is not None else ():
        hooks = {}
        for name in spec.linears:
            lin = get_module(layer, name)
            lin.weight.copy_(quantize_linear(lin, blocks).dequantize())
            hooks.update(act_quantizers({name: blocks}, {name: lin}, {}))
        set_act_quant(layer, hooks)
    if head is not None:
        lin = get_module(model, spec.lm_head)
        lin.weight.copy_(quantize_linear(lin, head).dequantize())
    if table is not None:
        weight = get_module(model, spec.embed).weight
        weight.copy_(quantize_weight(weight, bits=table.bits, block_size=64).dequantize())
    ppl = perplexity(model, windows).ppl
    model.load_state_dict(saved)
    for layer in layers:
        set_act_quant(layer, {})
    return ppl


@torch.no_grad()
def gptq_head_ppl(model, spec, windows, calib, *, block_size: int) -> tuple[float, float]:
    """PPL with lm_head alone w4 by GPTQ: (unrotated, rotated by a Hadamard rotation of its input)."""
    head = get_module(model, spec.lm_head)
    weight = head.weight.detach().clone()
    inputs = []
    hook = get_module(model, spec.final_norm).register_forward_hook(lambda m, i, out: inputs.append(out.float()))
    for start in range(0, len(calib), 2):
        model(torch.from_numpy(calib[start:start + 2]))
    hook.remove()
    h = hessian(torch.cat(inputs))
    q = rotation("hadamard", weight.shape[1])
    plain = gptq_quantize(weight, h, bits=4, block_size=block_size, act_order=True).dequantize()
    rotated = gptq_quantize(weight @ q, q.T @ h @ q, bits=4, block_size=block_size, act_order=True).dequantize() @ q.T
    out = []
    for w in (plain, rotated):
        head.weight.copy_(w)
        out.append(perplexity(model, windows).ppl)
    head.weight.copy_(weight)
    return out[0], out[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--rotation", choices=("none", "hadamard", "random"), default="hadamard")
    p.add_argument("--w4-block", type=int, help="INT4 block size for every w4 row (default: the target's w4, 64/128 on SmolLM2)")
    p.add_argument("--calib-text", help="also lm_head by GPTQ, rotated and not (16 windows of this text)")
    args = p.parse_args()
    model, tokenizer, spec = load_model(resolve_source(args.model))
    if spec.name not in ("llama", "mistral", "qwen2"):
        print(f"rotation_probe: {spec.name} is not a plain Llama-family model", file=sys.stderr)
        return 2
    ids = qtext.tokenize(tokenizer, qtext.eval_text(path=args.eval_text).text)
    windows = qtext.eval_windows(ids, 512, max_windows=args.windows)
    head = get_module(model, spec.lm_head)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied
    if args.calib_text:
        calib_ids = qtext.tokenize(tokenizer, qtext.calib_text(path=args.calib_text).text)
        calib = qtext.calib_windows(calib_ids, 512, (16,), seed=0)[0]
        for block_size in (64, 32):
            plain, rotated = gptq_head_ppl(model, spec, windows, calib, block_size=block_size)
            print(f"lm_head w4/{block_size} GPTQ alone: {plain:.4f} unrotated, {rotated:.4f} rotated")
    if args.rotation != "none":
        rotate(model, spec, rotation(args.rotation, model.config.hidden_size))
    cpu = get_target("cpu")
    w8, w4 = get_format("w8", cpu), get_format("w4", cpu)
    if args.w4_block:
        w4 = replace(w4, block_sizes=(args.w4_block,))
    print(f"rotation {args.rotation}, first {len(windows)} windows of 512, w4 blocks of {args.w4_block or '64/128'}")
    print(f"fp                               {perplexity(model, windows).ppl:.4f}")
    print(f"blocks w4                        {quantized_ppl(model, spec, windows, blocks=w4):.4f}")
    print(f"blocks w4, table + lm_head w4    {quantized_ppl(model, spec, windows, blocks=w4, head=w4, table=w4):.4f}")
    print(f"blocks w8, table + lm_head w4    {quantized_ppl(model, spec, windows, blocks=w8, head=w4, table=w4):.4f}")
    print(f"table w4 alone                   {quantized_ppl(model, spec, windows, table=w4):.4f}")
    print(f"lm_head w4 alone                 {quantized_ppl(model, spec, windows, head=w4):.4f}")
    print(f"lm_head w8 alone                 {quantized_ppl(model, spec, windows, head=w8):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
