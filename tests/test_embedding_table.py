"""The host-side embedding table: written by export, read by the runtime, rows as PyTorch dequantizes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qublast.formats import embed_format
from qublast.vocab import quantize_table
from runtime.embedding import EmbeddingError, EmbeddingTable, pack_int4_rows, unpack_int4_rows, write_table


@pytest.mark.parametrize("fmt", ["fp16", "w8", "w4"])
def test_table_round_trip(tmp_path, fmt):
    table = torch.randn(50, 256, generator=torch.Generator().manual_seed(0)) * 0.05  # [V, H]
    table[3, 7] = 1.0
    path = tmp_path / "embedding.safetensors"
    spec = embed_format(fmt)
    if spec.bits is None:
        write_table(path, weight_format=fmt, rows=table.numpy())
        expected = table.half().float().numpy()
    else:
        qt = quantize_table(table, spec)
        write_table(path, weight_format=fmt, rows=qt.q.numpy(), scale=qt.scale.numpy(), bits=spec.bits, block_size=qt.block_size)
        expected = qt.dequantize().numpy()
    loaded = EmbeddingTable.load(path)
    ids = np.array([[0, 3, 49, 3], [7, 7, 1, 2]])
    np.testing.assert_array_equal(loaded.lookup(ids), expected[ids])
    size = path.stat().st_size
    assert size == pytest.approx({"fp16": 2 * 50 * 256, "w8": 50 * 256 + 2 * 50, "w4": 50 * 128 + 2 * 50 * 2}[fmt], abs=600)
    with pytest.raises(ValueError, match="out of range"):
        loaded.lookup(np.array([[50]]))


def test_int4_rows_pack_low_nibble_first():
    codes = np.array([[1, -2, 7, -8]], np.int8)
    packed = pack_int4_rows(codes)
    assert packed.tolist() == [[0xE1, 0x87]]
    assert np.array_equal(unpack_int4_rows(packed), codes)


def test_corrupt_or_foreign_table_is_refused(tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a table")
    with pytest.raises(EmbeddingError, match="cannot read"):
        EmbeddingTable.load(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"embedding": np.zeros((2, 4), np.float16)}, str(foreign))
    with pytest.raises(EmbeddingError, match="not a version 1 QuBLAST embedding table"):
        EmbeddingTable.load(foreign)


def test_where_a_table_is_stored_and_what_it_costs():
    """A tied table stays in the graph, once, when both uses are unquantized, or when both take one
    quantized format on a target that gathers from lm_head's codes (CPU); every other pairing
    stores a host table beside lm_head, and its bytes count."""
    from qublast.arch import arch_for
    from qublast.formats import get_target
    from qublast.sizes import linear_bytes_in, vocab_bytes
    from qublast.vocab import side_table
    from tests.tiny import tiny_model

    for tied, embed, head, shared, outside in [
        (True, "fp16", "fp16", False, False), (True, "w4", "w4", False, True), (True, "w4", "w4", True, False),
        (True, "w8", "w8", True, False), (True, "w8", "w4", True, True), (False, "w8", "w8", True, True),
    ]:
        assert side_table(tied=tied, embed=embed, head=head, shared_quantized=shared) == outside, (tied, embed, head, shared)
    model = tiny_model("llama")
    spec = arch_for("llama")
    head_module = model.get_submodule(spec.lm_head)
    cpu, jetson = get_target("cpu"), get_target("jetson")
    assert cpu.shared_quantized_table and not jetson.shared_quantized_table
    assert vocab_bytes(model, spec, cpu, embed="w8", head="w8") == linear_bytes_in(head_module, "w8", cpu)
    assert vocab_bytes(model, spec, cpu, embed="w4", head="w8") > linear_bytes_in(head_module, "w8", cpu)
    assert vocab_bytes(model, spec, jetson, embed="w4", head="w4") > linear_bytes_in(head_module, "w4", jetson)


def test_replay_keeps_the_table_where_the_recipe_stored_it():
    """A CPU recipe with a tied w8/w8 pair replays with the table where it was stored: lm_head's
    codes when the recipe says "graph", its own host table when an older recipe says "side_table"."""
    from qublast.formats import get_target
    from qublast.recipe import validate
    from qublast.vocab import VocabTransform
    from tests.test_recipe import _recipe

    cpu = get_target("cpu")
    for storage, shared in (("graph", True), ("side_table", False)):
        recipe = _recipe()
        recipe["embedding"].update(format="w8", storage=storage)
        recipe["lm_head"]["format"] = "w8"
        assert VocabTransform.from_recipe(validate(recipe), cpu).shared_quantized is shared
