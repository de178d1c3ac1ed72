"""Recipe entries from calibration's results: per block, the vocabulary units, the target."""
from __future__ import annotations

from runtime.targets import Target

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .formats import block_size_for, embed_format, get_format, linear_format, table_bytes
from .sizes import block_bytes, linear_entry
from .vocab import is_tied, side_table


def target_entry(target: Target) -> dict:
    """What a recipe records of its target: export and reuse refuse a target with other formats."""
    return {
        "name": target.name, "graph_dtype": target.graph_dtype,
        "formats": {name: _format_entry(f) for name, f in target.formats.items()},
        "head_formats": list(target.head_formats), "ort_session": dict(target.ort_session),
    }


def _format_entry(fmt) -> dict:
    entry = {"bits": fmt.bits, "act": fmt.act, "per_channel": fmt.per_channel, "block_sizes": list(fmt.block_sizes)}
    if fmt.mix is not None:
        entry["mix"] = [part.name for part in fmt.mix]  # (bulk, rest): a block format, never a linear's
    return entry


def block_entries(model, spec: ArchSpec, target: Target, formats: list[str], qweights: dict, table: list[dict], *, scaling: bool,
                  quantizers: list[str]) -> list[dict]:
    """One recipe entry per block: format, map, quantizer (as applied: "gptq", "rtn", "+cbq" when
    reconstructed), sensitivity, linears with their errors and bytes."""
    out = []
    for index, (layer, fmt) in enumerate(zip(blocks_of(model, spec), formats)):
        chosen, quantizer = table[index][fmt], quantizers[index]
        block_format = get_format(fmt, target)
        linears = []
        for name in spec.linears:
            path = f"{spec.blocks}.{index}.{name}"
            entry = linear_entry(get_module(layer, name), name=name, path=path,
                                 fmt_name=linear_format(block_format, spec, name).name, target=target)
            entry["quantizer"] = quantizer if entry["bits"] else None
            if path in qweights:
                entry["error"] = qweights[path].stats.as_dict()
            if chosen.act_scales and name in chosen.act_scales:
                entry["act_scale"] = chosen.act_scales[name]
                entry["act_range"] = chosen.act_scales[name] * 127
            linears.append(entry)
        out.append({
            "index": index, "format": fmt, "alpha": chosen.alpha, "quantizer": quantizer if fmt != "fp16" else None,
            "map": chosen.scaled if scaling and fmt != "fp16" else None,
            "block_err": chosen.block_err, "block_err_unscaled": chosen.block_err_unscaled,
            "smooth": sorted(chosen.smooth or {}),
            "bytes": sum(e["bytes"] for e in linears), "bytes_fp16": block_bytes(layer, spec, "fp16", target),
            "sensitivity": {f: {"dce": s.dce, "kl": s.kl, "alpha": s.alpha, "map": s.scaled, "dce_map_off": s.dce_unscaled,
                                "kl_map_off": s.kl_unscaled, "estimated": s.estimated, "quantizer": s.quantizer}
                            for f, s in table[index].items()},
            "linears": linears,
        })
    return out


def vocab_entries(model, spec: ArchSpec, target: Target, *, embed: str, head: str, qweights: dict, table: dict) -> dict:
    """``{"embedding": ..., "lm_head": ...}``: formats, where the table lives, bytes, errors, sensitivity."""
    tied = is_tied(model, spec)
    weight = get_module(model, spec.embed).weight
    rows, width = weight.shape
    outside = side_table(tied=tied, embed=embed, head=head, shared_quantized=target.shared_quantized_table)
    fmt = embed_format(embed) if outside else get_format(head, target)  # in the graph: lm_head's own codes
    embedding = {
        "format": embed, "tied": tied, "storage": "side_table" if outside else "graph", "path": spec.embed,
        "shape": [rows, width], "bits": fmt.bits, "block_size": block_size_for(fmt, width) if fmt.bits else None,
        "bytes": table_bytes(fmt, rows, width) if outside else 0,  # a shared in-graph table is counted with lm_head
        "sensitivity": {f: {"dce": s.dce, "kl": s.kl} for f, s in table.get("embed", {}).items()},
    }
    if spec.embed in qweights:
        embedding["error"] = qweights[spec.embed].stats.as_dict()
    head_entry = linear_entry(get_module(model, spec.lm_head), name=spec.lm_head, path=spec.lm_head, fmt_name=head, target=target)
    if spec.lm_head in qweights:
        head_entry["error"] = qweights[spec.lm_head].stats.as_dict()
    head_entry["quantizer"] = table["lm_head"][head].quantizer if head_entry["bits"] else None
    lm_head = {"format": head, "tied": tied, "linears": [head_entry],
               "sensitivity": {f: {"dce": s.dce, "kl": s.kl, "quantizer": s.quantizer} for f, s in table.get("lm_head", {}).items()}}
    return {"embedding": embedding, "lm_head": lm_head}
