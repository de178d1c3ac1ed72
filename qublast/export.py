"""``python -m qublast.export``: calibrate, export and verify a bundle (thin CLI over ``export/``).

Every ``QublastError`` ends the run with one line on stderr and exit code 2, and so does a
system error (a full disk, a folder without permission): one line naming the file.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from runtime.targets import EMBED_FORMATS, TARGETS

from .calibrate import ALLOC_LOSSES, AUTO, DEFAULTS, CalibConfig
from .errors import InputError, QublastError
from .formats import ALL_FORMATS
from .reconstruct import RETUNES, ROUNDINGS
from .scaling import RANGE_METHODS
from .sensitivity import ESTIMATES
from .text import EVAL_SEQLEN

CALIBRATE_DESCRIPTION = ("calibrate only: decide the recipe (recipe.json + scales.safetensors in --out) without exporting; "
                         "python -m qublast.export --recipe OUT/recipe.json applies it")
# What only the export and its verification use: refused by ``python -m qublast.calibrate``.
EXPORT_ONLY = ("recipe", "eval_text", "eval_dataset", "seqlen", "max_eval_windows", "context")


def parser(*, calibrate_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qublast.calibrate" if calibrate_only else "python -m qublast.export",
                                description=CALIBRATE_DESCRIPTION if calibrate_only else __doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--target", default=DEFAULTS.target,
                   help="; ".join(f"{t.name}: {t.description}, formats {'/'.join(t.formats)}" for t in TARGETS.values()))
    p.add_argument("--model", help="hub id, local HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    what = "recipe" if calibrate_only else "bundle"
    p.add_argument("--out", type=Path, default=Path(what),
                   help=f"{what} folder (default: ./{what}); may be new, empty or an earlier bundle or recipe folder, which "
                        f"is replaced once the new one is complete")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace a file or a folder that is not a bundle (never the model, the other inputs, "
                        "the cache or the current directory)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--max-ppl-increase", type=float, help="max relative PPL increase, e.g. 0.01 (default)")
    mode.add_argument("--target-size", type=float, help="the whole deployed model's bytes as a fraction of its fp16 bytes")
    mode.add_argument("--blocks-size", type=float, help="the block linears' bytes as a fraction of their fp16 bytes "
                                                        "(embedding and lm_head as --embeddings / --lm-head say, default fp16)")
    mode.add_argument("--uniform", choices=ALL_FORMATS, help="every block in one format (baselines)")
    mode.add_argument("--formats", help="one format per block, comma-separated (e.g. w8,w4,...: another run's choice)")
    p.add_argument("--recipe", type=Path, help="reuse a recipe.json (scales.safetensors beside it)")
    p.add_argument("--lm-head", default=AUTO, choices=(AUTO, *ALL_FORMATS),
                   help="lm_head format; auto (default): allocation chooses under --max-ppl-increase / --target-size, else fp16")
    p.add_argument("--embeddings", default=AUTO, choices=(AUTO, *EMBED_FORMATS),
                   help="embedding table format (host-side table unless kept fp16 with a tied fp16 lm_head); auto as --lm-head")
    p.add_argument("--candidates", help="formats blocks may take, comma-separated (default: the target's; jetson fp16,w4m,w4, cpu fp16,w8,w4m,w4; "
                   "w8a8 on jetson and w4s on cpu on request, docs/results.md)")
    p.add_argument("--calib-text", help="calibration text file (train/validation text, never test: refused when it "
                                        "holds paragraphs of the evaluation text)")
    p.add_argument("--allow-test-calibration", action="store_true",
                   help="accept calibration text that shares paragraphs with the evaluation text")
    p.add_argument("--calib-dataset", help="calibration dataset name (wikitext2), validation split")
    p.add_argument("--eval-text", help="evaluation file in WikiText raw layout (e.g. wiki.test.raw)")
    p.add_argument("--eval-dataset", help="evaluation dataset name (wikitext2, wikitext103), test split")
    p.add_argument("--seqlen", type=int, default=EVAL_SEQLEN, help="evaluation window length (default %(default)s)")
    p.add_argument("--max-eval-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--calib-seqlen", type=int, default=DEFAULTS.calib_seqlen, help="calibration window length (default %(default)s)")
    p.add_argument("--calib-windows", type=int, default=DEFAULTS.sens_windows, help="windows for the sensitivity sweep (default %(default)s)")
    p.add_argument("--holdout-windows", type=int, default=DEFAULTS.holdout_windows, help="held-out windows for measured repair (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--safety", type=float, default=DEFAULTS.safety,
                   help="repair until held-out dCE + 2 stderr <= safety * ln(1+P) (default %(default)s: a margin for "
                   "the shift from calibration text to other text)")
    p.add_argument("--no-scaling", action="store_true", help="turn the activation scaling map off (ablation)")
    p.add_argument("--range-method", default=DEFAULTS.range_method, choices=RANGE_METHODS,
                   help="static INT8 activation range estimator for w8a8 (default %(default)s)")
    p.add_argument("--alloc-loss", default=DEFAULTS.alloc_loss, choices=ALLOC_LOSSES,
                   help="what allocation sums per block: kl (default; stable on few windows) or dce "
                        "(needs many --calib-windows)")
    p.add_argument("--spend-tries", type=int, default=DEFAULTS.spend_tries,
                   help="--max-ppl-increase: measurements spent moving to smaller plans while the held-out bound "
                        "leaves room, before reconstruction and again after it (default %(default)s; two-sided repair; 0 repairs upward only)")
    p.add_argument("--sweep", default=DEFAULTS.sweep, choices=ESTIMATES,
                   help="how the sensitivity sweep finds a block's end-to-end loss: fisher (default; from one backward "
                        "pass of the fp model, cost linear in the depth) or full (runs every later block to the logits "
                        "per measurement, cost quadratic in the depth)")
    p.add_argument("--quantizers", default=",".join(DEFAULTS.quantizers),
                   help="quantizers the sweep tries per block and format, the lower block output error kept: rtn, gptq "
                        "(default both)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ visits columns in order (default: by decreasing input power)")
    p.add_argument("--gptq-windows", type=int, default=DEFAULTS.gptq_windows,
                   help="GPTQ's own calibration windows of --calib-seqlen (default %(default)s)")
    p.add_argument("--reconstruct", type=int, default=DEFAULTS.reconstruct,
                   help="cross-block reconstruction: tune the scales of this many consecutive blocks at a time to match "
                        "the fp model's output (default %(default)s; 0 turns it off; docs/results.md)")
    p.add_argument("--reconstruct-steps", type=int, default=DEFAULTS.reconstruct_steps,
                   help="optimizer steps per reconstruction window (default %(default)s)")
    p.add_argument("--reconstruct-windows", type=int, default=DEFAULTS.reconstruct_windows,
                   help="token windows of --calib-seqlen reconstruction tunes on: the sweep's, then windows of its "
                        "own (default: the sweep's, --calib-windows; docs/results.md)")
    p.add_argument("--rounding", default=DEFAULTS.rounding, choices=ROUNDINGS,
                   help="what reconstruction tunes: fixed (the scales; the codes stay GPTQ's or round-to-nearest's, "
                        "default) or learned (the scales and every code's rounding, AutoRound-style straight-through; docs/results.md)")
    p.add_argument("--e2e-windows", type=int, default=DEFAULTS.e2e_windows,
                   help="after reconstruction, tune every quantized block's scales at once against the fp model's "
                        "next-token distribution (KL) on this many windows of --calib-seqlen of its own (default "
                        "%(default)s: off; 64 is what docs/results.md measured; minutes a plan)")
    p.add_argument("--e2e-epochs", type=int, default=DEFAULTS.e2e_epochs,
                   help="passes over the --e2e-windows, one window a step (default %(default)s)")
    p.add_argument("--retune", default=DEFAULTS.retune, choices=RETUNES,
                   help="which reconstruction windows a later plan of the repair tunes again: changed (default): only "
                        "those holding a changed block, the others keeping their tuned scales where these still fit better "
                        "on the new input; or all after its first changed block (slower; docs/results.md)")
    p.add_argument("--device", default=DEFAULTS.device, help="where calibration computes: cpu (default), cuda or cuda:N; "
                                                  "blocks move there one at a time")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=("float32", "float16", "bfloat16"),
                   help="the model's dtype during calibration (default float32; float16 suits the Jetson fp16 graph)")
    p.add_argument("--context", type=int, help="longest sequence the TensorRT engine's profiles take "
                                               "(default: 2048 or the model's positions if fewer)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "qublast")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


# What a recipe decides: giving one of these with --recipe would be ignored, so it is refused.
RECIPE_DECIDES = ("max_ppl_increase", "target_size", "blocks_size", "uniform", "formats", "lm_head", "embeddings",
                  "candidates", "calib_text", "calib_dataset", "calib_seqlen", "calib_windows", "holdout_windows", "seed",
                  "safety", "no_scaling", "range_method", "alloc_loss", "spend_tries", "quantizers", "no_act_order",
                  "gptq_windows", "reconstruct", "reconstruct_steps", "reconstruct_windows", "rounding", "retune", "allow_test_calibration", "sweep",
                  "e2e_windows", "e2e_epochs")


def given(p: argparse.ArgumentParser, argv: list[str]) -> dict[str, tuple[str, str | None]]:
    """``{dest: (flag, value)}`` of the options written in ``argv``, the one walk over it (abbreviations
    are off, so names are exact; ``value`` None for a switch or a flag missing its value)."""
    out = {}
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        action = p._option_string_actions.get(name) if token.startswith("--") else None
        if action is not None:
            if action.nargs == 0:
                value = None
            elif not eq:
                value = argv[i + 1] if i + 1 < len(argv) else None
            out[action.dest] = (name, value)
    return out


def _check_values(flags: dict, args: argparse.Namespace) -> None:
    """Every value written is non-empty and valid UTF-8; one source per text."""
    for name, value in flags.values():
        if value is None:
            continue
        if not value.strip():
            raise InputError(f"{name} is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{name} {value!r} is not valid UTF-8") from None
    for what in ("calib", "eval"):
        if getattr(args, f"{what}_text") is not None and getattr(args, f"{what}_dataset") is not None:
            raise InputError(f"give one of --{what}-text and --{what}-dataset")


def _check_unused(flags: dict, args: argparse.Namespace) -> None:
    """A flag the run would ignore is refused, naming why (a user who sets it expects an effect)."""
    if args.recipe is not None:
        return  # _check_recipe_flags: the recipe decides
    fixed = "--uniform" if args.uniform else ("--formats" if args.formats else None)
    sized = "--target-size" if args.target_size is not None else ("--blocks-size" if args.blocks_size is not None else None)
    names = _names("--quantizers", args.quantizers) or ()
    if fixed:
        candidates = {args.uniform} if args.uniform else set(_names("--formats", args.formats) or ())
    else:
        candidates = set(_names("--candidates", args.candidates) or TARGETS[args.target].candidates
                         if args.target in TARGETS else ())
    why = {
        "candidates": fixed and f"with {fixed} (the formats are fixed)",
        "alloc_loss": fixed and f"with {fixed} (nothing is allocated)",
        "spend_tries": (fixed or sized) and f"with {fixed or sized} (only --max-ppl-increase repairs)",
        "safety": (fixed or sized) and f"with {fixed or sized} (only --max-ppl-increase repairs)",
        "range_method": "w8a8" not in candidates and "without w8a8 among the formats (only w8a8 has activation ranges)",
        "no_act_order": "gptq" not in names and "without gptq in --quantizers",
        "gptq_windows": "gptq" not in names and "without gptq in --quantizers",
        "reconstruct_steps": args.reconstruct == 0 and "with --reconstruct 0",
        "rounding": args.reconstruct == 0 and "with --reconstruct 0",
        "retune": (args.reconstruct == 0 and "with --reconstruct 0")
                  or ((fixed or sized) and f"with {fixed or sized} (only --max-ppl-increase reconstructs more than one plan)"),
        "reconstruct_windows": args.reconstruct == 0 and "with --reconstruct 0",
        "e2e_windows": args.reconstruct == 0 and "with --reconstruct 0",
        "e2e_epochs": (args.reconstruct == 0 and "with --reconstruct 0") or (not args.e2e_windows and "without --e2e-windows"),
    }
    for dest, (flag, _) in flags.items():
        if why.get(dest):
            raise InputError(f"{flag} has no effect {why[dest]}; drop it")
    if args.reconstruct_steps > 10_000:
        raise InputError(f"--reconstruct-steps must be at most 10000, got {args.reconstruct_steps}")
    if args.e2e_epochs > 100:
        raise InputError(f"--e2e-epochs must be at most 100, got {args.e2e_epochs}")


def _check_target_flags(flags: dict, args: argparse.Namespace) -> None:
    if "context" in flags and args.target in TARGETS and TARGETS[args.target].engine != "tensorrt":
        raise InputError(f"--context sets the TensorRT engine's profiles; --target {args.target} builds no engine "
                         f"(its runtime takes sequences up to the model's positions)")


def _check_calibrate_flags(flags: dict, *, calibrate_only: bool) -> None:
    clash = [flag for dest, (flag, _) in flags.items() if dest in EXPORT_ONLY] if calibrate_only else []
    if clash:
        raise InputError(f"{', '.join(clash)} {'is' if len(clash) == 1 else 'are'} for the export; python -m qublast.calibrate "
                         f"writes only the recipe (drop {'it' if len(clash) == 1 else 'them'}, or run python -m qublast.export)")


def _check_recipe_flags(flags: dict, args: argparse.Namespace) -> None:
    if args.recipe is None:
        return
    clash = [flag for dest, (flag, _) in flags.items() if dest in RECIPE_DECIDES]
    if clash:
        raise InputError(f"--recipe decides what {', '.join(clash)} would set; drop {'it' if len(clash) == 1 else 'them'} "
                         f"(or calibrate again without --recipe)")


def _names(flag: str, value: str | None) -> tuple[str, ...] | None:
    """A comma-separated list flag: None when not given, else its non-empty names (an empty list is an error)."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise InputError(f"{flag} is empty; name at least one")
    return names


def config_from_args(args: argparse.Namespace, *, calibrate_only: bool = False):
    """Flags -> ``ExportConfig`` (validation happens in the config classes)."""
    calib = CalibConfig(
        target=args.target, max_ppl_increase=args.max_ppl_increase, target_size=args.target_size,
        blocks_size=args.blocks_size, uniform=args.uniform,
        formats=_names("--formats", args.formats),
        lm_head=args.lm_head, embeddings=args.embeddings,
        candidates=_names("--candidates", args.candidates),
        calib_seqlen=args.calib_seqlen, sens_windows=args.calib_windows, holdout_windows=args.holdout_windows,
        seed=args.seed, safety=args.safety, cache_dir=args.cache_dir,
        scaling=not args.no_scaling, range_method=args.range_method, alloc_loss=args.alloc_loss,
        quantizers=_names("--quantizers", args.quantizers), act_order=not args.no_act_order, gptq_windows=args.gptq_windows,
        reconstruct=args.reconstruct, reconstruct_steps=args.reconstruct_steps, rounding=args.rounding, retune=args.retune,
        reconstruct_windows=args.reconstruct_windows, e2e_windows=args.e2e_windows, e2e_epochs=args.e2e_epochs,
        device=args.device, dtype=args.dtype,
        spend_tries=args.spend_tries, sweep=args.sweep,
    )
    from export.pipeline import ExportConfig  # deferred heavy import (onnx, transformers): CalibConfig's flag errors stay fast

    return ExportConfig(
        out=args.out, target=args.target, model=args.model, recipe=args.recipe, calib=calib,
        calib_text=args.calib_text, calib_dataset=args.calib_dataset, eval_text=args.eval_text,
        eval_dataset=args.eval_dataset, seqlen=args.seqlen, max_eval_windows=args.max_eval_windows,
        context=args.context, threads=args.threads, trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite, allow_test_calibration=args.allow_test_calibration, calibrate_only=calibrate_only,
    )


class _Signalled(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so the staging folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, _frame):
    raise _Signalled(signum)


def main(argv: list[str] | None = None, *, calibrate_only: bool = False) -> int:
    """The CLI; with ``calibrate_only`` (``python -m qublast.calibrate``) the run stops at the recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(calibrate_only=calibrate_only)
    args = p.parse_args(argv)
    previous = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        flags = given(p, argv)
        _check_values(flags, args)
        _check_calibrate_flags(flags, calibrate_only=calibrate_only)
        _check_recipe_flags(flags, args)
        _check_target_flags(flags, args)
        _check_unused(flags, args)
        cfg = config_from_args(args, calibrate_only=calibrate_only)
        from export.pipeline import run  # deferred heavy import (onnx, transformers): the flag errors above stay fast

        run(cfg)
    except KeyboardInterrupt:
        _fail(f"interrupted (Ctrl-C); {args.out} is as it was")
        return 130
    except _Signalled as exc:
        _fail(f"stopped by signal {signal.Signals(exc.signum).name}; {args.out} is as it was")
        return 128 + exc.signum
    except QublastError as exc:
        _fail(str(exc))
        return 2
    except OSError as exc:  # the system refused: a full disk, a read-only or vanished folder
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}")
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _fail(message: str) -> None:
    """Print the error on a line of its own: a progress bar the failure interrupted is ended first."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"qublast: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
