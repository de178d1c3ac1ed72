"""The recipe: the versioned, self-describing record of what calibration decided.

``recipe.json`` (version 3; recipes of versions 1 and 2, made before targets, are refused with a
message to calibrate again) is one JSON object whose schema is code: ``qublast.schema`` (one
dataclass per section, every field typed and marked decided / measured / describes).
``validate`` checks a recipe against it, field by field, and the rules between fields, and
returns the typed ``Recipe``.

``"stage"``: "calibrated" (``python -m qublast.calibrate``'s recipe folder: decisions and what
calibration measured, sizes predicted) or "exported" (a bundle's: metrics measured through the
deployed graph); absent in recipes written before it, which were all exported.

``scales.safetensors`` holds, for every quantized linear (full module path ``P``, ``lm_head``
included) and a quantized embedding table (its module path), the fp32 tensor ``P.scale`` of
shape [out, in // block_size], and for every folded producer ``N`` of the scaling map its
per-channel scales ``N.smooth`` [in]. Round-to-nearest codes are not stored: they are
``clamp(round(w / scale))`` of the checkpoint's weight after the folds (for the table: of the
embedding module's output rows), which export recomputes exactly. Codes that are not (GPTQ's,
reconstruction's) are stored in their integer width: ``P.qweight_int4`` (uint8 [out, in / 2], two
codes per byte, element 2k in the low nibble) where they fit 4 bits, else ``P.qweight`` (int8);
files written before this stored ``P.qweight`` as float32 and read the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from runtime.embedding import pack_int4_rows, unpack_int4_rows
from runtime.stfile import canonical

from .entries import target_entry
from .errors import RecipeError
from .files import atomic_write_bytes, atomic_write_text
from .formats import ALL_FORMATS
from .schema import Linear, Recipe, parse, to_json

RECIPE_FORMAT = "qublast-recipe"
RECIPE_VERSION = 3
READABLE_VERSIONS = (3,)
REQUIRED_KEYS = ("model", "target", "calibration", "constraint", "embedding", "lm_head", "blocks", "allocation", "metrics")
REQUIRED_METRICS = (
    "ppl_fp", "ppl_quant_torch", "ppl_quant_ort", "size_bytes_fp16", "size_bytes",
    "size_bytes_blocks_fp16", "size_bytes_blocks", "eval_tokens", "seqlen",
)


# "calibrated": written by python -m qublast.calibrate, its metrics only predicted; "exported": a
# bundle's, measured through the deployed graph.
STAGES = ("calibrated", "exported")
CALIBRATED_METRICS = ("size_bytes_predicted", "size_bytes_fp16")


def write_recipe(recipe: dict, path: str | Path) -> None:
    """Validate and write ``recipe`` atomically."""
    validate(recipe)
    atomic_write_text(path, json.dumps(recipe, indent=1) + "\n")


def read_recipe(path: str | Path) -> dict:
    """Read and validate a recipe; any defect is a one-line ``RecipeError``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid JSON: {exc}") from exc
    validate(recipe)
    return recipe


def validate(recipe: dict) -> Recipe:
    """Check ``recipe`` against the schema (``qublast.schema``: every field's type, at its path) and the
    rules between fields: format tag, version, the stage's metrics, known formats, block indices.
    Returns the typed recipe; any defect is a one-line ``RecipeError``."""
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise RecipeError("not a QuBLAST recipe (missing format tag)")
    if recipe.get("version") in (1, 2):
        raise RecipeError(f"recipe version {recipe['version']} was made before deployment targets; calibrate again")
    if recipe.get("version") not in READABLE_VERSIONS:
        raise RecipeError(f"recipe version {recipe.get('version')!r} is not supported (expected one of {READABLE_VERSIONS})")
    missing = [k for k in REQUIRED_KEYS if k not in recipe]
    if missing:
        raise RecipeError(f"recipe lacks {', '.join(missing)}")
    typed = parse(recipe)
    if typed.stage not in STAGES:
        raise RecipeError(f"recipe stage {typed.stage!r} is not one of {', '.join(STAGES)}")
    missing = [k for k in (REQUIRED_METRICS if typed.stage == "exported" else CALIBRATED_METRICS) if k not in typed.metrics]
    if missing:
        raise RecipeError(f"recipe metrics lack {', '.join(missing)}")
    if [b.index for b in typed.blocks] != list(range(typed.model.num_blocks)):
        raise RecipeError("recipe blocks do not cover the model's blocks in order")
    formats = typed.target.formats
    for block in typed.blocks:
        for entry in [block, *block.linears]:
            if entry.format not in ALL_FORMATS:
                raise RecipeError(f"block {block.index}: unknown format {entry.format!r}")
            if entry.format not in formats:
                raise RecipeError(f"block {block.index}: format {entry.format!r} is not one of target "
                                  f"{typed.target.name!r}'s {sorted(formats)}")
        for entry in block.linears:
            if formats[entry.format].mix:
                raise RecipeError(f"block {block.index}: {entry.name} is in the mixed format {entry.format!r}; "
                                  f"a linear takes one of its parts {formats[entry.format].mix}")
    if typed.lm_head.format not in typed.target.head_formats:
        raise RecipeError(f"lm_head: format {typed.lm_head.format!r} is not one its target allows")
    if typed.embedding.format not in ALL_FORMATS:
        raise RecipeError(f"embedding: unknown format {typed.embedding.format!r}")
    return typed


def check_model(recipe: Recipe, weight_sha256: str) -> None:
    """Refuse a recipe made for another checkpoint."""
    expected = recipe.model.weight_sha256
    if expected != weight_sha256:
        raise RecipeError(
            f"recipe was made for weights {expected[:12]}…, this checkpoint is {weight_sha256[:12]}…"
        )


def check_target(recipe: Recipe, target) -> None:
    """Refuse a recipe made for a target whose formats differ from ``target``'s (a ``runtime.targets.Target``)."""
    made_for, wanted = to_json(recipe.target), target_entry(target)
    if made_for["graph_dtype"] != wanted["graph_dtype"]:
        differs = f"its graph is {wanted['graph_dtype']}, the recipe's {made_for['graph_dtype']}"
    elif made_for["formats"] != wanted["formats"]:
        ours, theirs = wanted["formats"], made_for["formats"]
        if list(ours) != list(theirs):
            differs = f"its formats are {'/'.join(ours)}, the recipe's {'/'.join(theirs)}"
        else:
            changed = [n for n in ours if ours[n] != theirs[n]]
            differs = (f"format{'s' if len(changed) > 1 else ''} {', '.join(changed)} "
                       f"{'are' if len(changed) > 1 else 'is'} stored or computed otherwise than in the recipe")
    else:
        return
    raise RecipeError(f"recipe was made for target {made_for['name']!r}; target {target.name!r} differs ({differs}): "
                      f"calibrate again with --target {target.name}")


CODES, PACKED = ".qweight", ".qweight_int4"  # a linear's stored codes: int8, or two per byte


def write_tensors(tensors: dict, path: str | Path) -> None:
    """Write ``scales.safetensors`` atomically: ``{path}.scale`` weight scales, ``{norm}.smooth`` map
    scales (fp32), and stored codes in their integer width: ``{path}.qweight_int4`` two per byte
    (uint8 [out, in / 2], ``runtime.embedding.pack_int4_rows``) where they fit 4 bits, else
    ``{path}.qweight`` int8."""
    data = {}
    for name, t in sorted(tensors.items()):
        if name.endswith(CODES):
            codes = t.to(torch.int8).contiguous()
            fits = codes.dim() == 2 and codes.shape[1] % 2 == 0 and (not codes.numel() or (int(codes.min()) >= -8 and int(codes.max()) <= 7))
            if fits:
                data[name[: -len(CODES)] + PACKED] = torch.from_numpy(pack_int4_rows(codes.numpy()))
            else:
                data[name] = codes
        else:
            data[name] = t.contiguous().float()
    atomic_write_bytes(path, canonical(save(data, metadata={"format": RECIPE_FORMAT, "version": str(RECIPE_VERSION)})))


def read_tensors(path: str | Path) -> dict:
    """The tensors of ``scales.safetensors`` by name, codes as int8 ``{path}.qweight`` (packed ones
    unpacked; files before 0.1.0's packing stored them as float32, which reads as before)."""
    try:
        loaded = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise RecipeError(f"cannot read scales {path}: {exc}") from exc
    out = {}
    for name, t in loaded.items():
        if name.endswith(PACKED):
            if t.dtype != torch.uint8 or t.dim() != 2:
                raise RecipeError(f"scales {path}: {name} is {t.dtype} {tuple(t.shape)}, not packed uint8 codes")
            out[name[: -len(PACKED)] + CODES] = torch.from_numpy(unpack_int4_rows(t.numpy()))
        else:
            out[name] = t
    return out


def block_linears(recipe: Recipe) -> dict[str, Linear]:
    """``{full module path: linear entry}`` for every block linear the recipe quantizes."""
    return {lin.path: lin for block in recipe.blocks for lin in block.linears if lin.bits is not None}


def quantized_linears(recipe: Recipe) -> dict[str, Linear]:
    """``{full module path: linear entry}`` for every graph linear the recipe quantizes (blocks and lm_head)."""
    out = block_linears(recipe)
    out.update({lin.path: lin for lin in recipe.lm_head.linears if lin.bits is not None})
    return out
