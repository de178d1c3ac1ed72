"""Greedy tokens of the deployed graph (runtime/, ONNX Runtime) vs the PyTorch fake-quantized model.

    python benchmarks/check_greedy.py BUNDLE --model MODEL [--tokens 24] [--prompt TEXT ...]

Prints, per prompt, whether the two token sequences are identical and the first divergence.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qublast.apply import fold_recipe, quantize_recipe  # noqa: E402
from qublast.models import load_model, resolve_source  # noqa: E402
from qublast.recipe import read_recipe, read_tensors  # noqa: E402
from runtime.bundle import open_bundle  # noqa: E402
from runtime.generate import generate_ids  # noqa: E402

PROMPTS = ("The tower is 324 metres tall, about the same height as", "In 1905, Albert Einstein published",
           "= Robert Boulter =\n\nRobert Boulter is an English", "The recipe for a good cup of tea is")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--model", help="the checkpoint the bundle was made from (default: embedded)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--prompt", action="append")
    args = p.parse_args()
    model, _, spec = load_model(resolve_source(args.model))
    recipe, tensors = read_recipe(args.bundle / "recipe.json"), read_tensors(args.bundle / "scales.safetensors")
    fold_recipe(model, spec, recipe, tensors)
    quantize_recipe(model, spec, recipe, tensors)
    bundle = open_bundle(args.bundle)
    same = 0
    prompts = args.prompt or PROMPTS
    for prompt in prompts:
        ids = bundle.tokenizer.encode(prompt, add_special_tokens=False).ids
        ours = list(generate_ids(bundle.model, ids, max_new_tokens=args.tokens))
        seq = list(ids)
        with torch.no_grad():
            for _ in range(args.tokens):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        ref = seq[len(ids):]
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        same += first is None
        print(f"{'SAME' if first is None else f'DIFFERS at token {first}'}: {prompt!r} -> {bundle.tokenizer.decode(ours)!r}")
    print(f"{same}/{len(prompts)} prompts give identical greedy tokens ({args.tokens} tokens each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
