"""Recipe and scales files: round trips, and every defect rejected with a RecipeError."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from qublast.entries import target_entry
from qublast.errors import RecipeError
from qublast.formats import get_target
from qublast.recipe import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    check_model,
    check_target,
    quantized_linears,
    read_recipe,
    read_tensors,
    validate,
    write_recipe,
    write_tensors,
)

SHA = "ab" * 32


def _linear(block: int, name: str, fmt: str, bits, block_size) -> dict:
    return {"name": name, "path": f"model.layers.{block}.{name}", "format": fmt, "bits": bits,
            "block_size": block_size, "act": "float", "shape": [8, 64], "bytes": 100, "error": None}


def _recipe() -> dict:
    """A minimal valid recipe for a 2-block model, built by hand."""
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "model": {"id": "tiny", "model_type": "llama", "weight_sha256": SHA, "num_blocks": 2},
        "target": target_entry(get_target("cpu")),
        "calibration": {"text": "embedded", "seqlen": 16, "windows": 2, "seed": 0, "candidates": ["fp16", "w8", "w4"]},
        "constraint": {"mode": "max_ppl_increase", "value": 0.05},
        "embedding": {"format": "w8", "tied": True, "storage": "side_table", "path": "model.embed_tokens", "shape": [320, 64],
                      "bits": 8, "block_size": None, "bytes": 20000},
        "lm_head": {"format": "fp16", "tied": True, "linears": []},
        "blocks": [
            {"index": 0, "format": "w8", "bytes": 100, "bytes_fp16": 200,
             "sensitivity": {"w8": {"dce": 0.001, "kl": 0.002}},
             "linears": [_linear(0, "self_attn.q_proj", "w8", 8, 64)]},
            {"index": 1, "format": "w4", "bytes": 60, "bytes_fp16": 200, "sensitivity": {},
             "linears": [_linear(1, "self_attn.q_proj", "w4", 4, 32), _linear(1, "mlp.down_proj", "fp16", None, None)]},
        ],
        "allocation": {"predicted_loss": 0.01, "heldout_ce_fp": 3.0, "heldout_ce_quant": 3.02, "repair": []},
        "metrics": {"ppl_fp": 10.0, "ppl_quant_torch": 10.2, "ppl_quant_ort": 10.2, "size_bytes_fp16": 1000,
                    "size_bytes": 600, "size_bytes_blocks_fp16": 400, "size_bytes_blocks": 160,
                    "eval_tokens": 512, "seqlen": 16},
    }


def test_round_trip(tmp_path):
    recipe = _recipe()
    path = tmp_path / "out" / "recipe.json"
    write_recipe(recipe, path)
    assert read_recipe(path) == recipe
    assert read_recipe(str(path)) == recipe
    assert json.loads(path.read_text(encoding="utf-8")) == recipe


def test_write_leaves_no_temp_files(tmp_path):
    write_recipe(_recipe(), tmp_path / "recipe.json")
    write_recipe(_recipe(), tmp_path / "recipe.json")  # overwrite
    write_tensors({"a": torch.ones(2, 1)}, tmp_path / "scales.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json", "scales.safetensors"]


def test_invalid_recipe_is_not_written(tmp_path):
    bad = _recipe()
    bad["version"] = 99
    with pytest.raises(RecipeError):
        write_recipe(bad, tmp_path / "recipe.json")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        read_recipe(tmp_path / "nope.json")
    with pytest.raises(RecipeError, match="not found"):
        read_recipe(tmp_path)  # a folder is not a recipe file


@pytest.mark.parametrize("content", [b"{\"format\": ", b"not json", b"\xff\xfe\x00{"])
def test_invalid_json(tmp_path, content):
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match="not valid JSON"):
        read_recipe(path)


def _mutations():
    def version(r):
        r["version"] = 99

    def version_missing(r):
        del r["version"]

    def tag(r):
        r["format"] = "something-else"

    def block_format(r):
        r["blocks"][0]["format"] = "w3"

    def linear_format(r):
        r["blocks"][1]["linears"][0]["format"] = "int4"

    def lm_head_format(r):
        r["lm_head"]["format"] = "w2"

    def embedding_format(r):
        r["embedding"]["format"] = "w2"

    def format_of_another_target(r):  # w8a8 is a Jetson format; this recipe's target is the CPU
        r["blocks"][0]["format"] = "w8a8"

    def linear_in_a_mixed_format(r):  # a mixed format is a block's; each linear takes one of its parts
        r["blocks"][1]["linears"][0]["format"] = "w4m"

    def old_version(r):
        r["version"] = 2

    def out_of_order(r):
        r["blocks"].reverse()

    def duplicate_index(r):
        r["blocks"][1]["index"] = 0

    def too_few_blocks(r):
        r["model"]["num_blocks"] = 3

    def no_num_blocks(r):
        del r["model"]["num_blocks"]

    muts = {f.__name__: f for f in (version, version_missing, tag, block_format, linear_format, lm_head_format,
                                    embedding_format, format_of_another_target, linear_in_a_mixed_format, old_version,
                                    out_of_order, duplicate_index, too_few_blocks, no_num_blocks)}
    for key in ("model", "target", "calibration", "constraint", "embedding", "lm_head", "blocks", "allocation", "metrics"):
        muts[f"missing_{key}"] = lambda r, key=key: r.pop(key)
    return muts


MUTATIONS = _mutations()


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_defects_are_recipe_errors(tmp_path, name):
    recipe = _recipe()
    MUTATIONS[name](recipe)
    with pytest.raises(RecipeError):
        validate(recipe)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    with pytest.raises(RecipeError):
        read_recipe(path)


def test_error_messages_name_the_defect():
    r = _recipe()
    r["version"] = 7
    with pytest.raises(RecipeError, match="version 7"):
        validate(r)
    r = _recipe()
    del r["metrics"]
    with pytest.raises(RecipeError, match="metrics"):
        validate(r)
    r = _recipe()
    r["blocks"][1]["format"] = "w3"
    with pytest.raises(RecipeError, match="block 1.*'w3'"):
        validate(r)
    with pytest.raises(RecipeError):
        validate([_recipe()])


def test_recipe_of_another_target_is_refused():
    """A CPU recipe (w8 blocks: INT8 weights with dynamic INT8 activations) is refused for Jetson,
    whose formats differ, with one line naming both targets."""
    recipe = _recipe()
    check_target(validate(recipe), get_target("cpu"))
    with pytest.raises(RecipeError, match="made for target 'cpu'.*target 'jetson'.*graph is float16.*--target jetson"):
        check_target(validate(recipe), get_target("jetson"))
    recipe["target"]["formats"]["w8"]["block_sizes"] = [32]  # same names, another layout
    with pytest.raises(RecipeError, match=r"format w8 is stored or computed otherwise than in the recipe\)"):
        check_target(validate(recipe), get_target("cpu"))
    recipe["target"]["formats"].pop("w4m")  # a recipe from a version without w4m
    with pytest.raises(RecipeError, match=r"formats are fp16/w8/w4m/w4s/w4, the recipe's fp16/w8/w4s/w4\)"):
        check_target(validate(recipe), get_target("cpu"))


def test_recipe_of_an_old_version_says_calibrate_again():
    r = _recipe()
    r["version"] = 2
    with pytest.raises(RecipeError, match="before deployment targets; calibrate again"):
        validate(r)


def test_check_model():
    recipe = _recipe()
    check_model(validate(recipe), SHA)
    with pytest.raises(RecipeError, match="abababababab"):
        check_model(validate(recipe), "cd" * 32)


def test_quantized_linears():
    recipe = _recipe()
    out = quantized_linears(validate(recipe))
    assert sorted(out) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert out["model.layers.1.self_attn.q_proj"].bits == 4


def test_scales_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    scales = {
        "model.layers.0.self_attn.q_proj": torch.rand(8, 1, generator=g).half().float(),
        "model.layers.1.self_attn.q_proj": torch.rand(8, 2, generator=g),
        "lm_head": torch.rand(5, 4, generator=g)[:, ::2],  # non-contiguous
    }
    path = tmp_path / "scales.safetensors"
    write_tensors(scales, path)
    back = read_tensors(path)
    assert sorted(back) == sorted(scales)
    for name, t in scales.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)


def test_read_tensors_errors(tmp_path):
    with pytest.raises(RecipeError):
        read_tensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(RecipeError):
        read_tensors(bad)


def test_round_trip_does_not_mutate_input(tmp_path):
    recipe = _recipe()
    before = copy.deepcopy(recipe)
    write_recipe(recipe, tmp_path / "r.json")
    assert recipe == before


def test_scales_store_codes_in_their_integer_width(tmp_path):
    """4-bit codes two per byte, 8-bit codes as int8, scales fp32: read back exactly, a fraction of
    float32 codes' bytes; a file of float32 codes (written before packing) reads the same."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.qweight": torch.randint(-8, 8, (64, 256), generator=g).to(torch.int8),
               "b.qweight": torch.randint(-128, 128, (32, 128), generator=g).to(torch.int8),
               "a.scale": torch.rand(64, 2, generator=g), "n.smooth": torch.rand(256, generator=g)}
    path = tmp_path / "scales.safetensors"
    write_tensors(tensors, path)
    back = read_tensors(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    float_codes = 64 * 256 * 4 + 32 * 128 * 4
    assert path.stat().st_size < float_codes / 5  # 8 KiB + 4 KiB of codes instead of 80 KiB
    old = tmp_path / "old.safetensors"
    save_file({name: t.float() for name, t in tensors.items()}, str(old))
    assert all(torch.equal(read_tensors(old)[name].to(t.dtype), t) for name, t in tensors.items())


@pytest.mark.parametrize("target_name", ["cpu", "jetson"])
def test_report_prices_the_vocabulary_as_calibration_does(target_name):
    """The report re-prices every embedding/lm_head pair from the recipe's shapes with the same
    accounting as calibration (a tied pair quantized alike is one table on the CPU target)."""
    from qublast.arch import arch_for
    from qublast.blocks import get_module
    from qublast.report import _vocab_bytes
    from qublast.sizes import vocab_bytes
    from qublast.vocab import is_tied
    from tests.tiny import tiny_model

    target = get_target(target_name)
    model = tiny_model("qwen2")  # tied
    spec = arch_for("qwen2")
    head = get_module(model, spec.lm_head)
    recipe = _recipe()
    recipe["embedding"].update(tied=is_tied(model, spec), shape=list(get_module(model, spec.embed).weight.shape))
    recipe["lm_head"]["linears"] = [{**_linear(0, "lm_head", "fp16", None, None), "path": "lm_head", "shape": list(head.weight.shape),
                                     "bias": head.bias is not None}]
    assert recipe["embedding"]["tied"]
    recipe = validate(recipe)
    for embed in ("fp16", "w8", "w4"):
        for head_format in ("fp16", "w4"):
            assert _vocab_bytes(recipe, embed, head_format, target) == vocab_bytes(model, spec, target, embed=embed, head=head_format)


# ---------------------------------------------------------------- the schema in code (qublast.schema)

@pytest.mark.parametrize("where,value,message", [
    (("blocks", 1, "linears", 0, "bits"), "four", r"^blocks\[1\]\.linears\[0\]\.bits: expected int or null, got 'four'$"),
    (("embedding", "tied"), "yes", r"^embedding\.tied: expected bool, got 'yes'$"),
    (("model", "num_blocks"), 2.5, r"^model\.num_blocks: expected int, got 2\.5$"),
    (("target", "formats", "w8", "block_sizes"), 64, r"^target\.formats\.w8\.block_sizes: expected a list, got 64$"),
    (("blocks", 0, "alpha"), [0.5], r"^blocks\[0\]\.alpha: expected an object, got a list$"),
    (("lm_head", "linears"), None, r"^lm_head\.linears: expected a list, got null$"),
])
def test_a_wrong_type_is_one_line_naming_its_path(where, value, message):
    r = _recipe()
    r["blocks"][0]["alpha"] = {"input_layernorm": 0.5}
    node = r
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(RecipeError, match=message):
        validate(r)


def test_a_missing_field_is_named_with_its_section():
    r = _recipe()
    del r["blocks"][1]["linears"][0]["path"]
    with pytest.raises(RecipeError, match=r"^blocks\[1\]\.linears\[0\]: lacks path$"):
        validate(r)


def test_typed_recipe_round_trips_to_the_same_json_and_keeps_unknown_keys():
    from qublast.schema import Block, Linear, Recipe

    r = _recipe()
    r["blocks"][0]["from_a_later_version"] = {"x": 1}
    typed = validate(r)
    assert isinstance(typed, Recipe) and isinstance(typed.blocks[1], Block) and isinstance(typed.blocks[1].linears[0], Linear)
    assert typed.blocks[1].linears[0].bits == 4 and typed.target.formats["w4"].bits == 4
    assert typed.to_json() == r and list(typed.to_json()) == list(r)  # same keys, same order


def test_every_field_has_a_role_and_decisions_drop_what_was_measured():
    import dataclasses

    from qublast import schema

    for section in schema.SECTIONS:
        for f in dataclasses.fields(section):
            assert f.metadata.get("role") in (schema.DECIDED, schema.MEASURED, schema.DESCRIBES), (section.__name__, f.name)
    r = _recipe()
    decided = schema.decisions(validate(r))
    assert "metrics" not in decided and "allocation" not in decided
    assert "sensitivity" not in decided["blocks"][0] and "bytes" not in decided["blocks"][0]["linears"][0]
    assert decided["blocks"][1]["linears"][0]["format"] == "w4" and decided["embedding"]["storage"] == "side_table"
    # two recipes that differ only in what was measured make the same decisions
    other = copy.deepcopy(r)
    other["metrics"]["ppl_quant_ort"] = 99.0
    other["blocks"][0]["sensitivity"]["w8"]["dce"] = 1.0
    other["blocks"][1]["linears"][0]["error"] = {"rel_err": 0.5}
    assert schema.decisions(validate(other)) == decided
    other["blocks"][1]["linears"][0]["block_size"] = 64
    assert schema.decisions(validate(other)) != decided


@pytest.mark.parametrize("ppl_ort,within", [(10.4, True), (10.6, False)])
def test_a_bundle_over_its_ppl_bound_says_so(ppl_ort, within, capsys):
    """Repair holds --max-ppl-increase on held-out calibration text; the verification on the user's
    text says when that did not carry over: a warning line, ``within_bound`` and a report line."""
    from export.pipeline import _bound_check
    from qublast.report import _bound_lines

    r = _recipe()
    r["calibration"]["safety"] = 0.9
    r["metrics"].update(ppl_quant_ort=ppl_ort, ppl_increase_ort=ppl_ort / 10.0 - 1, logit_agreement=None)
    verdict = _bound_check(r, "the test text")
    assert verdict == {"within_bound": within}
    err = capsys.readouterr().err
    assert ("over --max-ppl-increase 0.05" in err and "+6.00%" in err and "--safety 0.9" in err) is not within
    r["metrics"].update(verdict)
    assert any("Over the bound on this text" in line for line in _bound_lines(validate(r))) is not within
    r["constraint"] = {"mode": "target_size", "value": 0.5}
    assert _bound_check(r, "the test text") == {}
