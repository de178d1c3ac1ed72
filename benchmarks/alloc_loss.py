"""Which per-block loss should the knapsack sum? Measured from two sensitivity journals.

    python benchmarks/alloc_loss.py heldout --model GGUF --calib-text FILE --journal MAP.jsonl
    python benchmarks/alloc_loss.py plans --model GGUF --calib-text FILE --eval-text FILE \
        --journal MAP.jsonl --journal-off OFF.jsonl --sizes 0.4698,0.4

``heldout``: for every block's w4 entry of the map journal, the kept transform and the map off
are scored again (dCE, KL) on the 16 held-out calibration windows the sweep never saw, and
printed beside the journal's values from the sweep's 8 windows (results appended as JSON
lines to ``--out``). ``plans``: for each size and each loss (the sweep's dCE, its KL, the
held-out dCE, and the two pooled over 24 windows), the knapsack's plan from each journal
(map kept per block, map off) and its test PPL in PyTorch (the bundles' ORT PPL agrees to
0.002%). Numbers are printed as measured; nothing is assumed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qublast import text as qtext  # noqa: E402
from qublast.allocate import Choice, solve_for_size  # noqa: E402
from qublast.apply import BlockTransform, transforms_applied  # noqa: E402
from qublast.blocks import BlockRunner, blocks_of  # noqa: E402
from qublast.evaluate import window_ce  # noqa: E402
from qublast.models import load_model, resolve_source  # noqa: E402
from qublast.sensitivity import JOURNAL_VERSION, Sensitivity, _score  # noqa: E402
from qublast.sizes import block_bytes  # noqa: E402

LOSSES = ("sens_dce", "kl", "heldout_dce", "pooled_dce")


def read(path: Path) -> dict[tuple[int, str], Sensitivity]:
    """A sweep's journal, read only (the sweep's own reader would set aside a journal it cannot use)."""
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    if json.loads(header).get("version") != JOURNAL_VERSION:
        sys.exit(f"alloc_loss: {path} is not a version {JOURNAL_VERSION} sensitivity journal")
    entries = [Sensitivity(**json.loads(line)) for line in lines]
    return {(e.block, e.format): e for e in entries}


def heldout(args, model, spec, hold: np.ndarray) -> None:
    journal = read(args.journal)
    runner = BlockRunner(model, spec, torch.from_numpy(hold))
    fp = runner.fp_score.ce
    hidden = runner.first_hidden
    with open(args.out, "a", encoding="utf-8") as out:
        for index in range(args.blocks or len(runner.layers)):
            kept = journal[(index, "w4")]
            score = _score(runner, index, hidden, kept.transform())
            off = _score(runner, index, hidden, BlockTransform("w4", {k: 0.0 for k in kept.alpha})) if kept.scaled else score
            row = {"block": index, "format": "w4", "scaled": kept.scaled, "sens_dce": kept.dce, "sens_kl": kept.kl,
                   "sens_dce_off": kept.dce_unscaled, "sens_kl_off": kept.kl_unscaled,
                   "dce": score.ce - fp, "kl": score.kl, "dce_off": off.ce - fp, "kl_off": off.kl}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"block {index:2d} w4 map {'on ' if kept.scaled else 'off'}  8 windows: dCE {kept.dce:+.4f} (off {kept.dce_unscaled:+.4f})"
                  f"  held-out: dCE {row['dce']:+.4f} KL {row['kl']:.4f} (off dCE {row['dce_off']:+.4f} KL {row['kl_off']:.4f})", flush=True)
            hidden = runner.run_block(index, hidden)


def plans(args, model, spec, test: np.ndarray) -> None:
    journals = {"map": read(args.journal), "off": read(args.journal_off)}
    measured = {json.loads(line)["block"]: json.loads(line) for line in open(args.out, encoding="utf-8")}
    layers = blocks_of(model, spec)

    def loss(side: str, name: str, index: int, fmt: str) -> float:
        if fmt == "fp16":
            return 0.0
        entry = journals[side][(index, fmt)]
        if name == "kl":
            return entry.kl
        if fmt != "w4" or name == "sens_dce":  # held-out values exist for w4 only
            return entry.dce
        held = measured[index]["dce" if side == "map" else "dce_off"]
        return held if name == "heldout_dce" else (8 * entry.dce + 16 * held) / 24

    fp_test = window_ce(model, test, desc="ppl fp")
    fp16_bytes = sum(block_bytes(layer, spec, "fp16") for layer in layers)
    for size in (float(s) for s in args.sizes.split(",")):
        for name in args.losses.split(","):
            for side in ("map", "off"):
                options = [[Choice(f, block_bytes(layer, spec, f), loss(side, name, i, f)) for f in ("fp16", "w8", "w4")]
                           for i, layer in enumerate(layers)]
                plan = solve_for_size(options, int(size * fp16_bytes))
                transforms = [BlockTransform("fp16") if f == "fp16" else journals[side][(i, f)].transform()
                              for i, f in enumerate(plan.formats)]
                with transforms_applied(model, spec, transforms):
                    dce = float(np.mean(window_ce(model, test, desc="ppl quant") - fp_test))
                w4 = [i for i, f in enumerate(plan.formats) if f == "w4"]
                fp16 = [i for i, f in enumerate(plan.formats) if f == "fp16"]
                print(f"size {size} loss {name:11s} {side:3s}: w4 {w4} fp16 {fp16} predicted {plan.loss:+.4f}"
                      f"  test PPL {100 * (math.exp(dce) - 1):+.2f}%", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("heldout", "plans"))
    p.add_argument("--model", required=True)
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text")
    p.add_argument("--journal", type=Path, required=True, help="sensitivity journal of a run with the map")
    p.add_argument("--journal-off", type=Path, help="sensitivity journal of a --no-scaling run")
    p.add_argument("--sizes", default="0.4698,0.4")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"subset of {','.join(LOSSES)}")
    p.add_argument("--blocks", type=int, help="heldout: only the first N blocks")
    p.add_argument("--out", type=Path, default=Path("heldout.jsonl"))
    p.add_argument("--max-eval-windows", type=int, default=40)
    args = p.parse_args()
    model, tokenizer, spec = load_model(resolve_source(args.model))
    ids = qtext.tokenize(tokenizer, qtext.calib_text(path=args.calib_text).text)
    _, hold = qtext.calib_windows(ids, 512, (8, 16), seed=0)  # the export's defaults: 8 sweep, 16 held out
    if args.what == "heldout":
        heldout(args, model, spec, hold)
    else:
        test_ids = qtext.tokenize(tokenizer, qtext.eval_text(path=args.eval_text).text)  # the bundles' row layout
        plans(args, model, spec, qtext.eval_windows(test_ids, 512, max_windows=args.max_eval_windows))


if __name__ == "__main__":
    main()
