"""Where a bundle's static INT8 activation ranges cost PPL: on the evaluation text and on
calibration-side text, with the recipe as it is and with the ``w8a8`` blocks' activation
quantization turned off for one group of linears at a time (PyTorch, fake-quant, fp32).

    python benchmarks/static_ranges.py BUNDLE --model M.gguf --calib-text CALIB --eval-text TEST [--windows 40]

"validation" is the last ``--holdout`` windows of 512 of the calibration text (text of the kind
the ranges were fitted on, though not the exact windows calibration held out). A group whose
ranges fit the calibration text but not the evaluation text shows as a large drop on the
evaluation text only.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qublast import text as qtext  # noqa: E402
from qublast.apply import fold_recipe, quantize_recipe  # noqa: E402
from qublast.blocks import blocks_of, get_module  # noqa: E402
from qublast.deployed import act_quantizers, set_act_quant  # noqa: E402
from qublast.evaluate import perplexity  # noqa: E402
from qublast.formats import get_format, get_target  # noqa: E402
from qublast.models import load_model, resolve_source  # noqa: E402
from qublast.recipe import read_recipe, read_tensors  # noqa: E402

GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 (default 40)")
    p.add_argument("--holdout", type=int, default=16, help="validation windows from the calibration text's end")
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe, tensors = read_recipe(args.bundle / "recipe.json"), read_tensors(args.bundle / "scales.safetensors")
    model, tokenizer, spec = load_model(resolve_source(args.model))
    model.eval()
    test = qtext.eval_windows(qtext.tokenize(tokenizer, qtext.eval_text(path=args.eval_text).text), 512, max_windows=args.windows)
    calib = qtext.eval_windows(qtext.tokenize(tokenizer, qtext.calib_text(path=args.calib_text).text), 512)[-args.holdout:]
    with torch.no_grad():
        fp = {"test": perplexity(model, test, desc="fp test").ppl, "validation": perplexity(model, calib, desc="fp validation").ppl}
        fold_recipe(model, spec, recipe, tensors)
        quantize_recipe(model, spec, recipe, tensors)
        target = get_target(recipe["target"]["name"])
        static = [b for b in recipe["blocks"] if get_format(b["format"], target).act == "static"]
        if not static:
            print(f"{args.bundle}: no block with static activation ranges")
            return 0
        print(f"{args.bundle}: blocks with static INT8 activations {[b['index'] for b in static]}; "
              f"{len(test)} evaluation windows, {len(calib)} validation windows of 512")
        print("| static activations off for | dCE evaluation text | dCE validation text |")
        print("|---|---|---|")
        for label, off in [("nothing (the recipe)", ()), *GROUPS.items(), ("all linears", sum(GROUPS.values(), ()))]:
            layers = blocks_of(model, spec)
            for block in static:
                layer = layers[block["index"]]
                kept = {lin["name"]: get_module(layer, lin["name"]) for lin in block["linears"] if lin["name"].split(".")[-1] not in off}
                scales = {lin["name"]: lin["act_scale"] for lin in block["linears"]}
                formats = {lin["name"]: get_format(lin["format"], target) for lin in block["linears"]}
                set_act_quant(layer, act_quantizers(formats, kept, scales))
            dce = {name: math.log(perplexity(model, w, desc=label).ppl / fp[name]) for name, w in (("test", test), ("validation", calib))}
            print(f"| {label} | {dce['test']:.4f} | {dce['validation']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
