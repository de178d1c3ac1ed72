"""``report.md``, ``sensitivity.png`` and ``size_vs_ppl.png`` of a bundle, from its recipe alone."""
from __future__ import annotations

import math
from pathlib import Path

from .allocate import Choice, pareto_frontier
from .arch import arch_for
from .files import atomic_write_text
from .formats import get_format, get_target, linear_bytes, linear_format
from .schema import Block, Embedding, Recipe
from .sizes import vocab_unit_bytes

GGUF_CAVEAT = (
    "Caveat: the \"full-precision\" baseline of this checkpoint is itself a dequantized GGUF "
    "({gguf}) model, so re-quantizing it to INT8 is nearly free and INT4 errors are smaller than on "
    "a truly fp16-trained checkpoint. Results on it show the pipeline works and rank methods; they "
    "are not a claim about fp16 checkpoints."
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def write_report(recipe: Recipe, out_dir: Path, *, run: dict | None = None) -> None:
    """Write the three report files for ``recipe`` into ``out_dir``; ``run``: the run's record
    (``run.json``: wall times, memory), quoted in the report's cost lines."""
    _plot_sensitivity(recipe, out_dir / "sensitivity.png")
    _plot_size_vs_ppl(recipe, out_dir / "size_vs_ppl.png")
    atomic_write_text(out_dir / "report.md", render(recipe, run=run))


def render(recipe: Recipe, *, run: dict | None = None) -> str:
    """Markdown report: model, constraint, PPLs, sizes, per-block table, and the run's costs.
    Recipes made before ``run.json`` kept the costs in the recipe; they are read from there."""
    run = run or {"calibration_costs": recipe.calibration.costs or {}, "timings": recipe.metrics.get("timings", {})}
    m, model = recipe.metrics, recipe.model
    lines = [f"# QuBLAST report: {model.id}", ""]
    if model.gguf and any(tag in model.gguf.upper() for tag in ("Q2", "Q3", "Q4", "Q5", "Q6", "Q8")):
        lines += [f"> {GGUF_CAVEAT.format(gguf=model.gguf)}", ""]
    c, ev, t = recipe.constraint, recipe.evaluation or {}, recipe.target
    emb, head = recipe.embedding, recipe.lm_head
    measured = _measured(t.formats, recipe.blocks)
    lines += [
        f"- target: `{t.name}` ({t.graph_dtype} graph; formats {', '.join(t.formats)}; lm_head {', '.join(t.head_formats)})",
        f"- constraint: `{c.mode} = {c.value}`; embedding table `{emb.format}` ({_storage(emb)}); "
        f"lm_head `{head.format}` (tied to the embedding: {head.tied})",
        f"- evaluation: {ev.get('text')}, {ev.get('windows')} windows of {m['seqlen']} tokens, {m['eval_tokens']} predicted tokens",
        f"- calibration: {recipe.calibration.text}, seed {recipe.calibration.seed}; allocation sums each "
        f"unit's {_alloc_loss(recipe)}",
        f"- ONNX Runtime session ({ev.get('graph_optimization_level', 'ORT_ENABLE_ALL')}): {ev.get('ort_session')} "
        "(the runtime opens the bundle with the same options)",
        "",
        "| | PPL | vs fp |",
        "|---|---|---|",
        f"| fp (PyTorch fp32) | {m['ppl_fp']:.4f} | |",
        f"| quantized, PyTorch | {m['ppl_quant_torch']:.4f} | {100 * (m['ppl_quant_torch'] / m['ppl_fp'] - 1):+.2f}% |",
        f"| quantized, ONNX Runtime (deployed graph) | {m['ppl_quant_ort']:.4f} | {100 * (m['ppl_quant_ort'] / m['ppl_fp'] - 1):+.2f}% |",
        "",
        *_bound_lines(recipe),
        *_size_lines(m),
        "",
        f"Logit agreement PyTorch vs ORT: {m.get('logit_agreement')}. Timings (s): {_timings(run)}",
        "",
        f"Calibration costs: {_costs(run.get('calibration_costs', {}), reused=run.get('recipe'))}",
        "",
        *_peaks(recipe),
        *_vocab_lines(recipe),
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
        *_mixed_lines(recipe),
        "| block | format | map | alpha | bytes | " + " | ".join(f"dCE {f}" for f in measured) + " | KL w4 | dCE, map off | "
        "block output rel. MSE, map off | block output rel. MSE | worst linear rel. error |",
        "|---|---|---|---|---|" + "---|" * len(measured) + "---|---|---|---|---|",
    ]
    for block in recipe.blocks:
        sens = block.sensitivity
        errs = [(lin.error["rel_err"], lin.name) for lin in block.linears if lin.error]
        worst = f"{max(errs)[1]} {max(errs)[0]:.4f}" if errs else "-"
        fmt = block.format
        kept = {True: "on", False: "off"}.get(block.map, "-")  # null: fp16 block or --no-scaling
        lines.append(
            f"| {block.index} | {fmt} | {kept} | {_alphas(block.alpha)} | {block.bytes} | "
            + "".join(f"{_f(sens, f, 'dce')} | " for f in measured)
            + f"{_f(sens, 'w4', 'kl')} | {_f(sens, fmt, 'dce_map_off')} | "
            f"{_e(block.block_err_unscaled)} | {block.block_err or 0:.2e} | {worst} |"
        )
    lines += _act_ranges(recipe)
    lines += ["", "## Allocation", "", f"```\n{_allocation_text(recipe.allocation)}\n```", ""]
    return "\n".join(lines)


def _bound_lines(recipe: Recipe) -> list[str]:
    """Said only when the deployed graph went over ``--max-ppl-increase`` on the evaluation text."""
    if recipe.metrics.get("within_bound") is not False:
        return []
    return [f"**Over the bound on this text**: {100 * recipe.metrics['ppl_increase_ort']:+.2f}% against "
            f"`max_ppl_increase = {recipe.constraint.value}`. Repair held the bound on held-out windows of the "
            "calibration text; this text shifted further than `--safety` allows. A smaller "
            "`--safety`, or calibration text like this one, leaves more room.", ""]


def _mixed_lines(recipe: Recipe) -> list[str]:
    """What each mixed block format of the target stores where (its linears are listed in the recipe)."""
    mixed = {name: f.mix for name, f in recipe.target.formats.items() if f.mix}
    used = {b.format for b in recipe.blocks}
    lines = []
    for name, (bulk, rest) in mixed.items():
        if name in used:
            block = next(b for b in recipe.blocks if b.format == name)
            bulk_names = [lin.name for lin in block.linears if lin.format == bulk]
            lines.append(f"`{name}` blocks store {', '.join(bulk_names)} in `{bulk}` and their other linears in `{rest}`.")
    return [*lines, ""] if lines else []


def _is_head_codes(emb: Embedding) -> bool:
    """True when the recipe's table is lm_head's quantized codes in the graph (one copy)."""
    return emb.storage == "graph" and bool(emb.bits)


def _storage(emb: Embedding) -> str:
    if _is_head_codes(emb):
        return "in the graph once: lm_head's codes, rows gathered by GatherBlockQuantized"
    if emb.storage == "graph":
        return "in the graph, shared with lm_head"
    return "host-side table embedding.safetensors, fed as inputs_embeds"


def _size_lines(m: dict) -> list[str]:
    """Deployed sizes, read from the files, next to the fp16 references."""
    files = m.get("size_files", {})
    listing = ", ".join(f"{name} {_mb(n)}" for name, n in files.items())
    return [
        "| size | fp16 | deployed | reduction |",
        "|---|---|---|---|",
        f"| whole model (the deployed files) | {_mb(m['size_bytes_fp16'])} | {_mb(m['size_bytes'])} | "
        f"{100 * (1 - m['size_bytes'] / m['size_bytes_fp16']):.1f}% |",
        f"| block linears (their initializers in the graph) | {_mb(m['size_bytes_blocks_fp16'])} | {_mb(m['size_bytes_blocks'])} | "
        f"{100 * (1 - m['size_bytes_blocks'] / m['size_bytes_blocks_fp16']):.1f}% |",
        "",
        f"Files counted (every file the target loads, each tensor as the target stores it): {listing}. "
        f"Calibration predicted {_mb(m.get('size_bytes_predicted', 0))} for the whole model. The fp16 reference "
        "counts every distinct parameter of the checkpoint at two bytes.",
    ]


def _peaks(recipe: Recipe) -> list[str]:
    peaks = recipe.calibration.activation_peaks or {}
    if not peaks:
        return []
    lines = [f"Largest activation of the deployed model on calibration text: {peaks['max']:.4g} at {peaks['where']} "
             f"(fp16 holds up to 65504; an fp16 graph is refused above half of it).", ""]
    factors = recipe.model.rescale
    if factors:
        up = factors.get("up_down") or {}
        lines[-1:-1] = [
            f"Rescaled for fp16 (exact, `qublast.rescale`): the fp model reached {factors['peak_before']:.4g} at "
            f"{factors['where_before']}; the residual stream is divided by {factors['residual']:g} (embedding, residual "
            f"writers, tied head; norm epsilons / {factors['residual'] ** 2:g})"
            + (f", and act(gate) * up by {', '.join(f'{t:g} in block {b}' for b, t in sorted(up.items(), key=lambda kv: int(kv[0])))} "
               f"(moved into down_proj)" if up else "")
            + f". Largest fp activation after: {factors['peak_after']:.4g} at {factors['where_after']}, "
            f"{65504 / factors['peak_after']:.1f}x below fp16's largest value."]
    return lines


def _vocab_lines(recipe: Recipe) -> list[str]:
    """The embedding table and lm_head: format, bytes, sensitivity of each format."""
    emb, head = recipe.embedding, recipe.lm_head
    measured = _measured([*recipe.target.formats, "w8", "w4"], (emb, head)) or ["w8", "w4"]
    out = ["## Embedding table and lm_head", "",
           "| unit | format | storage | bytes | rel. error | " + " | ".join(f"dCE / KL {f}" for f in measured) + " |",
           "|---|---|---|---|---|" + "---|" * len(measured)]
    head_lin = head.linears[0]
    for name, unit, storage, size, err in (
        ("embedding", emb, _storage(emb), emb.bytes or "(in lm_head's)", (emb.error or {}).get("rel_err")),
        ("lm_head", head, "graph MatMulNBits, its codes also the table" if _is_head_codes(emb)
         else "graph MatMul", head_lin.bytes, (head_lin.error or {}).get("rel_err")),
    ):
        sens = unit.sensitivity
        cells = [f"{sens[f]['dce']:+.5f} / {sens[f]['kl']:.5f}" if f in sens else "-" for f in measured]
        rel = "-" if err is None else f"{err:.4f}"
        out.append(f"| {name} | {unit.format} | {storage} | {size} | {rel} | " + " | ".join(cells) + " |")
    return out + [""]


def _measured(formats, units) -> list[str]:
    """The quantized formats among ``formats`` (in order, once each) that some unit's sensitivity measured."""
    return [f for f in dict.fromkeys(formats) if f != "fp16" and any(f in unit.sensitivity for unit in units)]


def _act_ranges(recipe: Recipe) -> list[str]:
    """Static INT8 activation ranges of every w8a8 linear input."""
    rows = [(b.index, lin.name, lin.act_range) for b in recipe.blocks for lin in b.linears if lin.act_range]
    if not rows:
        return []
    method = recipe.calibration.range_method
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


def _costs(costs: dict, *, reused: str | None = None) -> str:
    """The sweep's measurements, their wall time and GPTQ's share, the repair's time, peak memory."""
    if reused:
        return f"none in this run: the recipe {reused} was reused"
    if not costs:
        return "not recorded"
    return (f"{costs['measurements']} sensitivity measurements, {costs['measured_s']:.0f} s measured (GPTQ "
            f"{costs['gptq_s']:.0f} s of it; this run's sweep {costs['sweep_s']:.0f} s, the rest came from the journal), "
            f"allocation and repair {costs.get('allocation_s', 0):.0f} s, "
            f"{_reconstruction_cost(costs)}peak memory {costs['peak_rss_mb']:.0f} MB")


def _reconstruction_cost(costs: dict) -> str:
    if "reconstruction_s" not in costs:
        return ""
    runs = costs.get("reconstructions", 1)
    e2e = f", end-to-end tuning {costs['e2e_s']:.0f} s of it" if "e2e_s" in costs else ""
    return f"cross-block reconstruction {costs['reconstruction_s']:.0f} s ({runs} plan{'s' if runs != 1 else ''} reconstructed{e2e}), "


def _timings(run: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in run.get("timings", {}).items())


def _allocation_text(allocation: dict) -> str:
    out = [f"{k}: {v}" for k, v in allocation.items() if k != "repair"]
    for step in allocation.get("repair", []):
        blocks, vocab = step["formats"][:-1], step["formats"][-1]
        counts = {f: blocks.count(f) for f in sorted(set(blocks))}
        shift = f"{step['dce']:+.5f} +- {step['stderr']:.5f}, bound {step['measured']:+.5f}" if "dce" in step else f"{step['measured']:+.5f}"
        predicted = f"predicted {step['predicted']:.5f}, " if "predicted" in step else ""
        size = f", {step['bytes']} bytes" if "bytes" in step else ""
        out.append(f"{step.get('action', 'repair')}: {predicted}held-out dCE {shift}, blocks {counts}, embedding/lm_head {vocab}{size}")
    return "\n".join(out)


def _plot_sensitivity(recipe: Recipe, path: Path) -> None:
    import matplotlib  # figures only: importing this module neither loads matplotlib (~0.3 s) nor picks its backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display backend

    fig, ax = plt.subplots(figsize=(9, 4))
    blocks = recipe.blocks
    formats = sorted({f for b in blocks for f in b.sensitivity if f != "fp16"})
    vocab = {"embedding": (-1, recipe.embedding.sensitivity), "lm_head": (len(blocks), recipe.lm_head.sensitivity)}
    markers = {"w8a8": "^", "w8": "o", "w4m": "D", "w4s": "v", "w4": "s"}
    for fmt in formats:
        ax.plot([b.index for b in blocks], [b.sensitivity[fmt]["dce"] for b in blocks], marker=markers.get(fmt, "o"), label=fmt)
    for unit, (x, sens) in vocab.items():
        for fmt, values in sens.items():
            if fmt != "fp16":
                ax.plot([x], [values["dce"]], marker=markers.get(fmt, "o"), color="black", ls="none")
    ax.set_xticks([-1, *range(0, len(blocks), 5), len(blocks)], ["emb", *map(str, range(0, len(blocks), 5)), "head"])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("block (emb: embedding table, head: lm_head; black markers)")
    ax.set_ylabel("dCE when only this unit is quantized (nats/token)")
    ax.set_title("Per-unit sensitivity" if formats else "Per-unit sensitivity (blocks not measured: fixed formats)")
    if formats:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_size_vs_ppl(recipe: Recipe, path: Path) -> None:
    """Predicted PPL of every Pareto-optimal allocation vs whole-model size, with the chosen one measured."""
    import matplotlib  # figures only: importing this module neither loads matplotlib (~0.3 s) nor picks its backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display backend

    m = recipe.metrics
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loss = _alloc_loss(recipe)
    options = _options(recipe, loss)
    if options:
        rest = m["size_bytes_predicted"] - sum(_chosen_bytes(recipe))
        frontier = pareto_frontier(options)
        ax.plot([(p.bytes + rest) / m["size_bytes_fp16"] for p in frontier], [m["ppl_fp"] * math.exp(p.loss) for p in frontier],
                ".-", ms=3, label=f"predicted (sum of units' {'KL' if loss == 'kl' else 'dCE'})")
    x = m["size_bytes"] / m["size_bytes_fp16"]
    ax.plot([x], [m["ppl_quant_torch"]], "s", label="chosen: PyTorch")
    ax.plot([x], [m["ppl_quant_ort"]], "x", ms=10, label="chosen: ONNX Runtime")
    ax.axhline(m["ppl_fp"], color="grey", lw=0.5, label="fp")
    ax.set_xlabel("whole model, fraction of fp16 bytes (deployed files)")
    ax.set_ylabel("PPL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _options(recipe: Recipe, loss: str):
    """Allocation options rebuilt from the recipe (blocks, then the vocabulary unit), or [] when not measured."""
    target = get_target(recipe.target.name)
    blocks = recipe.blocks
    if not all(b.sensitivity for b in blocks) or len(blocks[0].sensitivity) < 2:
        return []
    spec = arch_for(recipe.model.model_type)
    options = [[Choice(f, _bytes_in(b, f, target, spec), s[loss]) for f, s in b.sensitivity.items()] for b in blocks]
    emb, head = recipe.embedding, recipe.lm_head
    vocab = [Choice(f"{e}/{h}", _vocab_bytes(recipe, e, h, target), es[loss] + hs[loss])
             for e, es in emb.sensitivity.items() for h, hs in head.sensitivity.items()]
    return options + ([vocab] if vocab else [[Choice("fixed", _chosen_bytes(recipe)[-1], 0.0)]])


def _chosen_bytes(recipe: Recipe) -> list[int]:
    """Bytes of the chosen option of every unit (blocks, then the vocabulary unit)."""
    target = get_target(recipe.target.name)
    return [b.bytes for b in recipe.blocks] + [_vocab_bytes(recipe, recipe.embedding.format, recipe.lm_head.format, target)]


def _vocab_bytes(recipe: Recipe, embed: str, head: str, target) -> int:
    emb, lin = recipe.embedding, recipe.lm_head.linears[0]
    return vocab_unit_bytes(target, embed=embed, head=head, tied=emb.tied, table_shape=tuple(emb.shape),
                            head_shape=tuple(lin.shape), head_bias=lin.bias)


def _alloc_loss(recipe: Recipe) -> str:
    """The per-block loss allocation summed ("kl" or "dce"); recipes before the choice summed dCE."""
    return recipe.calibration.alloc_loss


def _bytes_in(block: Block, fmt: str, target, spec) -> int:
    """Block bytes in ``fmt`` from its linears' shapes (the recipe stores only the chosen format's)."""
    block_format = get_format(fmt, target)
    return sum(linear_bytes(linear_format(block_format, spec, lin.name), *lin.shape, target=target,
                            has_bias=lin.bias) for lin in block.linears)
