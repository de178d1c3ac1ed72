"""Where a bundle's PPL bound goes between the calibration text and the evaluation text.

    python benchmarks/text_shift.py MODEL BUNDLE [--calib-text FILE] [--eval-text FILE]
                                    [--windows 40] [--threads 2]

The calibration text is the one the recipe names (a file, or the embedded excerpt) unless
``--calib-text`` is given; the evaluation text defaults to WikiText-2's test file in
``../shared/assets`` (read as the export reads ``--eval-text``).

Repair holds ``--max-ppl-increase`` on held-out windows of the calibration text. This measures the
bundle's plan (its recipe and scales, applied in PyTorch as the export's verification applies them)
against the fp model, per token, on:

- the held-out windows repair measured (the same seed and counts as the bundle's calibration);
- the windows GPTQ fitted (its first 16);
- ``--windows`` calibration windows no stage of calibration used;
- the first ``--windows`` windows of the evaluation text (the 40-window protocol by default),
  and within them the tokens whose id never occurs in the calibration text versus the others.

Printed per set: fp CE, dCE (mean over windows +- standard error) and dCE per fp nat. The gap
between held-out and unused windows is what choosing among plans on the same 16 windows costs;
the gap between unused windows and the evaluation text is the text shift `--safety` is for.
Nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ASSETS = Path(__file__).resolve().parents[2] / "shared/assets/wikitext-2"


def row(name: str, fp: np.ndarray, quant: np.ndarray, mask: np.ndarray | None = None) -> str:
    if mask is None:
        d = (quant - fp).mean(axis=1)
        return (f"| {name} | {fp.shape[0]} | {fp.size} | {fp.mean():.4f} | {d.mean():.5f} +- {d.std(ddof=1) / np.sqrt(len(d)):.5f} "
                f"| {d.mean() / fp.mean():.5f} |")
    d = (quant - fp)[mask]
    if not d.size:
        return f"| {name} | - | 0 | - | - | - |"
    return f"| {name} | - | {int(mask.sum())} | {fp[mask].mean():.4f} | {d.mean():.5f} (per token) | {d.mean() / fp[mask].mean():.5f} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("bundle", type=Path)
    p.add_argument("--calib-text", type=Path, help="default: the text the recipe was calibrated on")
    p.add_argument("--eval-text", type=Path, default=ASSETS / "wiki.test.raw")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    for path in (args.calib_text, args.eval_text, args.bundle / "recipe.json", args.bundle / "scales.safetensors"):
        if path is not None and not path.is_file():
            p.error(f"not a file: {path}")
    if args.windows < 2 or args.threads < 1:
        p.error("--windows must be >= 2 and --threads >= 1")

    from qublast.apply import fold_recipe, quantize_recipe
    from qublast.errors import QublastError
    from qublast.evaluate import token_ce
    from qublast.models import load_model, resolve_source
    from qublast.recipe import read_recipe, read_tensors, validate
    from qublast.text import calib_text, calib_windows, eval_text, eval_windows, tokenize

    torch.set_num_threads(args.threads)
    try:
        recipe = read_recipe(args.bundle / "recipe.json")
        cal = recipe["calibration"]
        if "sens_windows" not in cal or "holdout_windows" not in cal:
            p.error("the recipe does not record its calibration windows (made before they were recorded)")
        label = cal["text"]
        if args.calib_text is None and not (label.startswith("embedded:") or label.startswith("file:")):
            p.error(f"the recipe was calibrated on {label}: give that text with --calib-text")
        if args.calib_text is None and label.startswith("file:") and not Path(label[5:]).is_file():
            p.error(f"the recipe's calibration text {label[5:]} is not here: give it with --calib-text")
        model, tokenizer, spec = load_model(resolve_source(args.model))
        path = args.calib_text or (label[5:] if label.startswith("file:") else None)
        calib = tokenize(tokenizer, calib_text(path=str(path) if path else None).text)
        counts = (cal["sens_windows"], cal["holdout_windows"], cal.get("gptq_windows") or 0, args.windows)
        _, held, fit, unused = calib_windows(calib, cal["seqlen"], counts, seed=cal["seed"])
        test = eval_windows(tokenize(tokenizer, eval_text(path=str(args.eval_text)).text), recipe["metrics"]["seqlen"],
                            max_windows=args.windows)
    except QublastError as exc:
        p.error(str(exc))
    sets = {"held-out (repair's)": held, "GPTQ's fit windows": fit[:16], "unused calibration windows": unused,
            "evaluation text": test}
    sets = {k: v for k, v in sets.items() if len(v)}
    fp = {k: token_ce(model, v, batch_size=1, desc=f"fp {k}") for k, v in sets.items()}
    typed = validate(recipe)
    scales = read_tensors(args.bundle / "scales.safetensors")
    fold_recipe(model, spec, typed, scales)
    quantize_recipe(model, spec, typed, scales)
    quant = {k: token_ce(model, v, batch_size=1, desc=f"quantized {k}") for k, v in sets.items()}

    print(f"{args.bundle}: constraint {recipe['constraint']}, calibration {path or label}, evaluation {args.eval_text}")
    print("| windows | n | tokens | fp CE | dCE | dCE / fp CE |\n|---|---|---|---|---|---|")
    for k in sets:
        print(row(k, fp[k], quant[k]))
    seen = np.zeros(int(max(calib.max(), test.max())) + 1, dtype=bool)
    seen[calib] = True
    unseen = ~seen[test[:, 1:]]
    print(row("evaluation: tokens never in the calibration text", fp["evaluation text"], quant["evaluation text"], unseen))
    print(row("evaluation: the other tokens", fp["evaluation text"], quant["evaluation text"], ~unseen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
