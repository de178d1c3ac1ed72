"""Probe: end-to-end tuning of a bundle's weight scales against the fp model's logits (issue 28).

Cross-block reconstruction tunes each window of two blocks against the fp model's hidden state.
This probe takes a finished bundle (its recipe and codes), keeps every code, and tunes one
log-gain per scale group of every quantized block linear, all blocks at once, to minimise the KL
divergence from the fp model's next-token distribution to the quantized model's (the teacher is
the checkpoint itself, no labels), on calibration windows no stage of the bundle's calibration
used (the draw after the sweep's, held-out and GPTQ windows, same seed). The tuned scales are
rounded to fp16, as the graph stores them. It prints the KL on the held-out calibration windows
and the PyTorch perplexity on the evaluation windows before and after, so the gain is judged on
text the tuning never saw.

    python -m benchmarks.e2e_probe --model /tmp/dg/smollm2-degridded --bundle BUNDLE \
        --eval-text wiki.test.raw --calib-text wiki.valid.calib.txt [--tune-windows 64 --epochs 2]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from qublast.apply import fold_recipe, quantize_recipe
from qublast.blocks import get_module
from qublast.deployed import recipe_codes
from qublast.errors import QublastError
from qublast.evaluate import perplexity
from qublast.models import load_model, resolve_source
from qublast.quant import QuantizedWeight
from qublast.recipe import block_linears, read_recipe, read_tensors, validate
from qublast.reconstruct import _Dequantized, kl_passes, logit_kl
from qublast.text import calib_text, calib_windows, eval_text, eval_windows, tokenize

USED = (8, 16, 32)  # the sweep's, held-out and GPTQ windows of a default calibration (seed 0)


@torch.no_grad()
def mean_kl(student, teacher, windows) -> tuple[float, float]:
    """(mean KL(teacher || student), mean CE difference student - teacher on the next tokens) over ``windows``."""
    total = dce = 0.0
    for row in windows:
        ids = torch.from_numpy(row[None]).long()
        s, t = student(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids, use_cache=False).logits
        total += float(logit_kl(s, t))
        labels = ids[0, 1:]
        dce += float(torch.nn.functional.cross_entropy(s[0, :-1].float(), labels)
                     - torch.nn.functional.cross_entropy(t[0, :-1].float(), labels))
    return total / len(windows), dce / len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bundle", required=True, help="a bundle folder (recipe.json, scales.safetensors)")
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--calib-text", required=True)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows")
    ap.add_argument("--tune-windows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    for flag, path in (("--eval-text", args.eval_text), ("--calib-text", args.calib_text),
                       ("--bundle", bundle / "recipe.json"), ("--bundle", bundle / "scales.safetensors")):
        if not Path(path).is_file():
            print(f"e2e_probe: error: {flag}: no file {path}", file=sys.stderr)
            sys.exit(2)
    if min(args.windows, args.tune_windows, args.epochs, args.seqlen) < 1 or not args.lr > 0:
        print("e2e_probe: error: --windows, --tune-windows, --epochs, --seqlen must be >= 1 and --lr > 0", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    try:
        model, tokenizer, spec = load_model(resolve_source(args.model))
        recipe = validate(read_recipe(bundle / "recipe.json"))
        tensors = read_tensors(bundle / "scales.safetensors")
    except QublastError as exc:
        print(f"e2e_probe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    teacher = copy.deepcopy(model).eval()
    model.eval()
    for p in [*model.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    fold_recipe(model, spec, recipe, tensors)
    codes = {}
    for path, entry in block_linears(recipe).items():
        weight = get_module(model, path).weight
        q, scale = recipe_codes(weight, tensors, path, bits=entry.bits, block_size=entry.block_size)
        codes[path] = QuantizedWeight(q=q, scale=scale.float(), bits=entry.bits, block_size=entry.block_size, stats=None)
    quantize_recipe(model, spec, recipe, tensors)

    ids = tokenize(tokenizer, calib_text(path=args.calib_text).text)
    _sens, holdout, _gptq, tune = calib_windows(ids, args.seqlen, (*USED[:3], args.tune_windows), seed=0)
    test = eval_windows(tokenize(tokenizer, eval_text(path=args.eval_text).text), args.seqlen, max_windows=args.windows)
    started = time.perf_counter()
    base = perplexity(teacher, test, desc="ppl fp").ppl
    before = perplexity(model, test, desc="ppl bundle").ppl
    kl_before, dce_before = mean_kl(model, teacher, holdout)
    test_kl_before, test_dce_before = mean_kl(model, teacher, test)
    print(f"fp PPL {base:.4f}; bundle PPL {before:.4f} ({before / base - 1:+.2%}); held-out KL {kl_before:.5f} dCE {dce_before:.5f}; "
          f"test KL {test_kl_before:.5f} dCE {test_dce_before:.5f} ({time.perf_counter() - started:.0f} s)", flush=True)

    modules = {}
    for path, qw in codes.items():
        linear = get_module(model, path)
        parametrize.register_parametrization(linear, "weight", _Dequantized(qw))
        modules[path] = linear.parametrizations.weight[0]
    started = time.perf_counter()
    kl_passes(model, teacher, [m.gain for m in modules.values()], torch.from_numpy(tune).long(),
              epochs=args.epochs, lr=args.lr, log=lambda line: print(line, flush=True))
    step = args.epochs * len(tune)
    tuned = {path: m.tuned(codes[path]) for path, m in modules.items()}
    for path in modules:
        parametrize.remove_parametrizations(get_module(model, path), "weight", leave_parametrized=False)
    with torch.no_grad():
        for path, qw in tuned.items():
            linear = get_module(model, path)
            linear.weight.data = qw.dequantize().to(linear.weight.dtype)
    gains = torch.cat([(tuned[p].scale / codes[p].scale).log().flatten() for p in tuned])
    after = perplexity(model, test, desc="ppl tuned").ppl
    kl_after, dce_after = mean_kl(model, teacher, holdout)
    test_kl_after, test_dce_after = mean_kl(model, teacher, test)
    print(f"tuned: PPL {after:.4f} ({after / base - 1:+.2%}); held-out KL {kl_after:.5f} ({kl_after / kl_before - 1:+.1%}) "
          f"dCE {dce_after:.5f}; test KL {test_kl_after:.5f} dCE {test_dce_after:.5f}; "
          f"log-gains |mean| {float(gains.abs().mean()):.4f} max {float(gains.abs().max()):.4f}; "
          f"{step} steps, {time.perf_counter() - started:.0f} s", flush=True)
    if not math.isfinite(after):
        sys.exit(1)


if __name__ == "__main__":
    main()
