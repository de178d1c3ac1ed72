"""The recipe's schema in code: one dataclass per section of ``recipe.json``, every field typed
and marked with its role.

Roles (``role(field)``):

- ``DECIDED``: what calibration chose and export applies (formats, scaling-map alphas, quantizers,
  where the table lives, rescaling factors). Replaying a recipe (``--recipe``) reads only these
  and the ``DESCRIBES`` fields; ``decisions(recipe)`` returns exactly that part.
- ``MEASURED``: what was measured to decide or to check (sensitivities, errors, peaks, perplexities,
  sizes from the files, costs). A replay measures them again.
- ``DESCRIBES``: what the recipe is for and how it was made (the model's identity, the target's
  formats, the calibration settings, the constraint).

``parse(obj)`` checks a recipe's JSON object against the schema and returns the typed
``Recipe``; every defect is one ``RecipeError`` line naming the field by its path (e.g.
``blocks[3].linears[1].bits: expected int or null, got 'four'``). Keys the schema does not
name are kept (``extra``), so a recipe written by a later version still reads, and
``Recipe.to_json()`` gives back the object that was parsed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import RecipeError

DECIDED, MEASURED, DESCRIBES = "decided", "measured", "describes"


def decided(**kw):
    return field(metadata={"role": DECIDED}, **kw)


def measured(**kw):
    return field(metadata={"role": MEASURED}, **kw)


def describes(**kw):
    return field(metadata={"role": DESCRIBES}, **kw)


def role(f: dataclasses.Field) -> str:
    return f.metadata.get("role", DESCRIBES)


Number = Union[int, float]  # JSON does not tell 1.0 from 1


@dataclass
class FormatSpec:
    """One format as the target stores and computes it (``qublast.entries.target_entry``)."""
    bits: int | None = describes()
    act: str = describes()
    per_channel: bool = describes()
    block_sizes: list[int] = describes()
    mix: list[str] | None = describes(default=None)


@dataclass
class Target:
    name: str = describes()
    graph_dtype: str = describes()
    formats: dict[str, FormatSpec] = describes()
    head_formats: list[str] = describes()
    ort_session: dict[str, Any] = describes(default_factory=dict)


@dataclass
class Model:
    id: str = describes()
    model_type: str = describes()
    weight_sha256: str = describes()
    num_blocks: int = describes()
    gguf: str | None = describes(default=None)
    max_positions: int | None = describes(default=None)
    rescale: dict[str, Any] | None = decided(default=None)  # qublast.rescale's factors (and the peaks that chose them)


@dataclass
class Calibration:
    text: str = describes()
    seed: int = describes()
    candidates: list[str] = describes()
    seqlen: int | None = describes(default=None)
    alloc_loss: str = describes(default="dce")
    quantizers: list[str] | None = describes(default=None)
    range_method: str | None = describes(default=None)
    activation_peaks: dict[str, Any] | None = measured(default=None)
    costs: dict[str, Any] | None = measured(default=None)


@dataclass
class Constraint:
    mode: str = describes()
    value: Any = describes()  # a number, or the format names of --uniform / --formats


@dataclass
class Linear:
    name: str = describes()
    path: str = describes()
    format: str = decided()
    bits: int | None = decided()
    block_size: int | None = decided()
    act: str = decided()
    shape: list[int] = describes()
    bytes: int = measured()
    per_channel: bool = decided(default=False)
    bias: bool = describes(default=False)
    quantizer: str | None = decided(default=None)
    error: dict[str, Number] | None = measured(default=None)  # rel_err, max_abs_err, mse, clip_mean of the weights
    act_scale: Number | None = decided(default=None)  # static INT8 activations (w8a8): the Q/DQ scale
    act_range: Number | None = describes(default=None)  # the same as a range, act_scale x 127 (for the report)


@dataclass
class Block:
    index: int = describes()
    format: str = decided()
    linears: list[Linear] = decided()
    alpha: dict[str, Number] = decided(default_factory=dict)
    smooth: list[str] = decided(default_factory=list)
    map: bool | None = decided(default=None)
    quantizer: str | None = decided(default=None)
    bytes: int = measured(default=0)
    bytes_fp16: int = measured(default=0)
    block_err: Number | None = measured(default=None)
    block_err_unscaled: Number | None = measured(default=None)
    sensitivity: dict[str, dict[str, Any]] = measured(default_factory=dict)


@dataclass
class Embedding:
    format: str = decided()
    tied: bool = describes()
    storage: str = decided()
    path: str = describes()
    shape: list[int] = describes()
    bits: int | None = decided()
    block_size: int | None = decided()
    bytes: int = measured()
    error: dict[str, Number] | None = measured(default=None)
    sensitivity: dict[str, dict[str, Any]] = measured(default_factory=dict)


@dataclass
class LmHead:
    format: str = decided()
    tied: bool = describes()
    linears: list[Linear] = decided(default_factory=list)
    sensitivity: dict[str, dict[str, Any]] = measured(default_factory=dict)


@dataclass
class Recipe:
    format: str = describes()
    version: int = describes()
    model: Model = describes()
    target: Target = describes()
    calibration: Calibration = describes()
    constraint: Constraint = describes()
    embedding: Embedding = decided()
    lm_head: LmHead = decided()
    blocks: list[Block] = decided()
    allocation: dict[str, Any] = measured()  # the repair's trail: plans, predicted and measured losses
    metrics: dict[str, Any] = measured()  # sizes from the files, perplexities (stage "exported") or predicted sizes
    stage: str = describes(default="exported")  # recipes before calibrate-only folders were all exported
    evaluation: dict[str, Any] | None = measured(default=None)

    def to_json(self) -> dict:
        return to_json(self)


SECTIONS = (Recipe, Model, Target, FormatSpec, Calibration, Constraint, Block, Linear, Embedding, LmHead)


def parse(obj: Any) -> Recipe:
    """The typed recipe of a JSON object; a defect is one ``RecipeError`` line naming its path."""
    return _parse(obj, Recipe, "recipe")


def to_json(value: Any) -> Any:
    """The JSON object of a parsed recipe (or part): the schema's fields where the source had them,
    and the keys it did not name, in the source's order."""
    return _json(value, drop=None)


def decisions(recipe: Recipe) -> dict:
    """The recipe's JSON without its measured fields (and without keys the schema does not name):
    what a replay applies."""
    return _json(recipe, drop=MEASURED)


def _json(value: Any, *, drop: str | None) -> Any:
    if dataclasses.is_dataclass(value):
        present = getattr(value, "_present", None)
        out = {f.name: _json(getattr(value, f.name), drop=drop) for f in dataclasses.fields(value)
               if (present is None or f.name in present) and role(f) != drop}
        if drop is not None:
            return out
        out.update(getattr(value, "_extra", {}))
        order = getattr(value, "_order", None)
        return {k: out[k] for k in order} if order is not None else out
    if isinstance(value, list):
        return [_json(v, drop=drop) for v in value]
    if isinstance(value, dict):
        return {k: _json(v, drop=drop) for k, v in value.items()}
    return value


def fields_by_role(cls: type, wanted: str) -> list[str]:
    """Names of ``cls``'s fields with role ``wanted``."""
    return [f.name for f in dataclasses.fields(cls) if role(f) == wanted]


# ---------------------------------------------------------------- checking JSON against the annotations

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _parse(obj: Any, tp: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(obj, dict):
            raise RecipeError(f"{path}: expected an object, got {_kind(obj)}")
        hints, values = _hints(tp), {}
        missing = [f.name for f in dataclasses.fields(tp) if f.name not in obj
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecipeError(f"{path}: lacks {', '.join(missing)}")
        for f in dataclasses.fields(tp):
            if f.name in obj:
                values[f.name] = _parse(obj[f.name], hints[f.name], f"{path}.{f.name}" if path != "recipe" else f.name)
        value = tp(**values)
        names = {f.name for f in dataclasses.fields(tp)}
        value._present = set(values)  # type: ignore[attr-defined]
        value._extra = {k: v for k, v in obj.items() if k not in names}  # type: ignore[attr-defined]
        value._order = list(obj)  # type: ignore[attr-defined]
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if obj is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _parse(obj, option, path)
            except RecipeError as exc:
                if not str(exc).startswith(f"{path}: expected "):  # the value has the kind, a part of it is wrong
                    raise
        raise RecipeError(f"{path}: expected {_name(tp)}, got {_kind(obj)}")
    if origin is list:
        if not isinstance(obj, list):
            raise RecipeError(f"{path}: expected a list, got {_kind(obj)}")
        return [_parse(v, args[0], f"{path}[{i}]") for i, v in enumerate(obj)]
    if origin is dict:
        if not isinstance(obj, dict):
            raise RecipeError(f"{path}: expected an object, got {_kind(obj)}")
        return {k: _parse(v, args[1], f"{path}.{k}") for k, v in obj.items()}
    if tp is Any:
        return obj
    if tp is float:
        ok = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    elif tp is int:
        ok = isinstance(obj, int) and not isinstance(obj, bool)
    else:
        ok = isinstance(obj, tp)
    if not ok:
        raise RecipeError(f"{path}: expected {_name(tp)}, got {_kind(obj)}")
    return obj


def _name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        base = " or ".join(_name(a) for a in args)
        return f"{base} or null" if type(None) in typing.get_args(tp) else base
    return getattr(tp, "__name__", str(tp))


def _kind(obj: Any) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, (dict, list)):
        return f"a {'list' if isinstance(obj, list) else 'object'}"
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."
