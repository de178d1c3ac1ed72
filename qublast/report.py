"""``report.md``, ``sensitivity.png`` and ``size_vs_ppl.png`` of a bundle, from its recipe alone."""
from __future__ import annotations

import math
from pathlib import Path

from .files import atomic_write_text

GGUF_CAVEAT = (
    "Caveat: the \"full-precision\" baseline of this checkpoint is itself a dequantized GGUF "
    "({gguf}) model, so re-quantizing it to INT8 is nearly free and INT4 errors are smaller than on "
    "a truly fp16-trained checkpoint. Results on it show the pipeline works and rank methods; they "
    "are not a claim about fp16 checkpoints."
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def write_report(recipe: dict, out_dir: Path) -> None:
    """Write the three report files for ``recipe`` into ``out_dir``."""
    _plot_sensitivity(recipe, out_dir / "sensitivity.png")
    _plot_size_vs_ppl(recipe, out_dir / "size_vs_ppl.png")
    atomic_write_text(out_dir / "report.md", render(recipe))


def render(recipe: dict) -> str:
    """Markdown report: model, constraint, PPLs, sizes, per-block table."""
    m, model = recipe["metrics"], recipe["model"]
    lines = [f"# QuBLAST report: {model['id']}", ""]
    if model.get("gguf") and any(tag in model["gguf"].upper() for tag in ("Q2", "Q3", "Q4", "Q5", "Q6", "Q8")):
        lines += [f"> {GGUF_CAVEAT.format(gguf=model['gguf'])}", ""]
    c, ev = recipe["constraint"], recipe.get("evaluation", {})
    lines += [
        f"- constraint: `{c['mode']} = {c['value']}`; lm_head: `{recipe['lm_head']['format']}`"
        f" (tied to embeddings: {recipe['lm_head'].get('tied')}); embeddings kept fp16",
        f"- evaluation: {ev.get('text')}, {ev.get('windows')} windows of {m['seqlen']} tokens, {m['eval_tokens']} predicted tokens",
        f"- calibration: {recipe['calibration']['text']}, seed {recipe['calibration']['seed']}; allocation sums each "
        f"block's {_alloc_loss(recipe)}",
        f"- ONNX Runtime session: {ev.get('ort_session')}",
        "",
        "| | PPL | vs fp |",
        "|---|---|---|",
        f"| fp (PyTorch fp32) | {m['ppl_fp']:.4f} | |",
        f"| quantized, PyTorch | {m['ppl_quant_torch']:.4f} | {100 * (m['ppl_quant_torch'] / m['ppl_fp'] - 1):+.2f}% |",
        f"| quantized, ONNX Runtime (deployed graph) | {m['ppl_quant_ort']:.4f} | {100 * (m['ppl_quant_ort'] / m['ppl_fp'] - 1):+.2f}% |",
        "",
        "| size | fp16 | deployed | reduction |",
        "|---|---|---|---|",
        f"| whole model | {_mb(m['size_bytes_fp16'])} | {_mb(m['size_bytes'])} | {100 * (1 - m['size_bytes'] / m['size_bytes_fp16']):.1f}% |",
        f"| block linears | {_mb(m['size_bytes_blocks_fp16'])} | {_mb(m['size_bytes_blocks'])} | {100 * (1 - m['size_bytes_blocks'] / m['size_bytes_blocks_fp16']):.1f}% |",
        "",
        f"ONNX files on disk (fp32 graph, kept tensors stored fp32): {_mb(m.get('onnx_file_bytes', 0))}. "
        f"Logit agreement PyTorch vs ORT: {m.get('logit_agreement')}. Timings (s): {_timings(m)}",
        "",
        "## Blocks",
        "",
        "map: `on` where the block keeps the scaling map in its format, `off` where it keeps the map off "
        "(the search found nothing better than the map off, or the map's transform did not lower dCE: both "
        "are measured on the same calibration windows and the lower is kept), `-` for fp16 blocks and "
        "`--no-scaling` runs. alpha: the map's exponent per foldable group (producer: alpha; 0 = no fold "
        "for that group). The dCE columns are each format's kept transform; \"dCE, map off\" and the two "
        "rel. MSE columns are the block's own format with the map off and as kept (output error on the "
        "search's calibration tokens): the per-block ablation of the map.",
        "",
        "| block | format | map | alpha | bytes | dCE w8a8 | dCE w8 | dCE w4 | KL w4 | dCE, map off | "
        "block output rel. MSE, map off | block output rel. MSE | worst linear rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in recipe["blocks"]:
        sens = block.get("sensitivity", {})
        errs = [(lin["error"]["rel_err"], lin["name"]) for lin in block["linears"] if "error" in lin]
        worst = f"{max(errs)[1]} {max(errs)[0]:.4f}" if errs else "-"
        fmt = block["format"]
        kept = {True: "on", False: "off"}.get(block.get("map"), "-")  # null: fp16 block or --no-scaling
        lines.append(
            f"| {block['index']} | {fmt} | {kept} | {_alphas(block.get('alpha'))} | {block['bytes']} | {_f(sens, 'w8a8', 'dce')} | "
            f"{_f(sens, 'w8', 'dce')} | {_f(sens, 'w4', 'dce')} | {_f(sens, 'w4', 'kl')} | {_f(sens, fmt, 'dce_map_off')} | "
            f"{_e(block.get('block_err_unscaled'))} | {block.get('block_err', 0):.2e} | {worst} |"
        )
    lines += _act_ranges(recipe)
    lines += ["", "## Allocation", "", f"```\n{_allocation_text(recipe['allocation'])}\n```", ""]
    return "\n".join(lines)


def _act_ranges(recipe: dict) -> list[str]:
    """Static INT8 activation ranges of every w8a8 linear input."""
    rows = [(b["index"], lin["name"], lin["act_range"]) for b in recipe["blocks"] for lin in b["linears"] if lin.get("act_range")]
    if not rows:
        return []
    method = recipe["calibration"].get("range_method")
    out = ["", f"## Activation ranges (INT8, per tensor, {method})", "", "| block | linear input | range |", "|---|---|---|"]
    return out + [f"| {i} | {name} | {r:.4g} |" for i, name, r in rows]


def _alphas(alpha: dict | float | None) -> str:
    """Per-group alphas (version 2 recipes) or the one alpha of a version 1 recipe."""
    if isinstance(alpha, dict):
        return ", ".join(f"{producer.split('.')[-1]} {a:.1f}" for producer, a in alpha.items()) or "-"
    return "-" if alpha is None else f"{alpha:.1f}"


def _e(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _f(sens: dict, fmt: str, key: str) -> str:
    value = sens.get(fmt, {}).get(key)
    return "-" if value is None or fmt == "fp16" else f"{value:+.5f}"


def _timings(m: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in m.get("timings", {}).items())


def _allocation_text(allocation: dict) -> str:
    out = [f"{k}: {v}" for k, v in allocation.items() if k != "repair"]
    for step in allocation.get("repair", []):
        counts = {f: step["formats"].count(f) for f in sorted(set(step["formats"]))}
        shift = f"{step['dce']:+.5f} +- {step['stderr']:.5f}, bound {step['measured']:+.5f}" if "dce" in step else f"{step['measured']:+.5f}"
        out.append(f"repair step: held-out dCE {shift}, formats {counts}")
    return "\n".join(out)


def _plot_sensitivity(recipe: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    blocks = recipe["blocks"]
    formats = sorted({f for b in blocks for f in b.get("sensitivity", {}) if f != "fp16"})
    for fmt in formats:
        ax.plot([b["index"] for b in blocks], [b["sensitivity"][fmt]["dce"] for b in blocks], marker="o", label=fmt)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("block")
    ax.set_ylabel("dCE when only this block is quantized (nats/token)")
    ax.set_title("Per-block sensitivity" if formats else "Per-block sensitivity (not measured: uniform recipe)")
    if formats:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_size_vs_ppl(recipe: dict, path: Path) -> None:
    """Predicted PPL of every Pareto-optimal allocation vs size, with the chosen one measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .allocate import Choice, pareto_frontier

    m = recipe["metrics"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    blocks = recipe["blocks"]
    loss = _alloc_loss(recipe)
    if all(b.get("sensitivity") for b in blocks):
        options = [[Choice(f, _bytes_in(b, f), s[loss]) for f, s in b["sensitivity"].items()] for b in blocks]
        frontier = pareto_frontier(options)
        fp16 = m["size_bytes_blocks_fp16"]
        ax.plot([p.bytes / fp16 for p in frontier], [m["ppl_fp"] * math.exp(p.loss) for p in frontier], ".-", ms=3,
                label=f"predicted (sum of block {'KL' if loss == 'kl' else 'dCE'})")
    x = m["size_bytes_blocks"] / m["size_bytes_blocks_fp16"]
    ax.plot([x], [m["ppl_quant_torch"]], "s", label="chosen: PyTorch")
    ax.plot([x], [m["ppl_quant_ort"]], "x", ms=10, label="chosen: ONNX Runtime")
    ax.axhline(m["ppl_fp"], color="grey", lw=0.5, label="fp")
    ax.set_xlabel("block linears, fraction of fp16 bytes")
    ax.set_ylabel("PPL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _alloc_loss(recipe: dict) -> str:
    """The per-block loss allocation summed ("kl" or "dce"); recipes before the choice summed dCE."""
    return recipe["calibration"].get("alloc_loss", "dce")


def _bytes_in(block: dict, fmt: str) -> int:
    """Block bytes in ``fmt`` from its linears' shapes (the recipe stores only the chosen format's)."""
    from .formats import get_format, linear_bytes

    return sum(linear_bytes(get_format(fmt), *lin["shape"], has_bias=lin.get("bias", False)) for lin in block["linears"])
