"""Held-out passes that start at the first block a plan changes give a full pass's numbers."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from qublast.blocks import blocks_of
from qublast.evaluate import PeakRecorder, window_ce
from qublast.heldout import PrefixPasses
from qublast.models import arch_spec_of
from tests.tiny import VOCAB, tiny_model


@contextlib.contextmanager
def _changed_from(model, spec, k: int):
    """Blocks k.. perturbed (a plan quantizing them), restored after."""
    saved = []
    for layer in list(blocks_of(model, spec))[k:]:
        for p in layer.parameters():
            if p.dim() == 2:
                saved.append((p, p.data.clone()))
                p.data.mul_(1.01 + 0.01 * k)
    try:
        yield
    finally:
        for p, data in saved:
            p.data.copy_(data)


def _setting(model_type: str, layers: int = 6):
    model = tiny_model(model_type, layers=layers)
    spec = arch_spec_of(model)
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1)).numpy()
    return model, spec, windows


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "falcon_h1", "mamba"])
def test_passes_from_a_kept_block_give_the_full_pass_numbers_bit_for_bit(model_type):
    """Plans whose fp prefix is 3, 4, 2, 5 blocks: each pass equals a full pass exactly; after the
    first, block 0 never runs and the later passes start at kept blocks."""
    model, spec, windows = _setting(model_type)
    passes = PrefixPasses(model, spec, windows)
    first = blocks_of(model, spec)[0]
    inner = next(m for m in first.children())
    calls = []
    hook = inner.register_forward_hook(lambda *_a: calls.append(1))
    starts = []
    for k in (3, 4, 2, 5):
        with _changed_from(model, spec, k):
            calls.clear()
            before = passes.skipped_blocks
            got = passes.window_ce(k)
            ran = len(calls)
            full = window_ce(model, windows)
        assert np.array_equal(got, full), (model_type, k)
        starts.append((passes.skipped_blocks - before) // passes.batches)
        assert ran == (passes.batches if k == 3 else 0)
    hook.remove()
    assert starts == [0, 3, 2, 4]  # the first pass keeps blocks 1..3' inputs, the second block 4's


def test_a_changed_prefix_or_table_is_not_skipped():
    """A prefix block or the embedding table that differs from the pass that kept the states is
    caught by the digest: the pass starts before the changed block (in full for the table) and
    still gives the full pass's numbers."""
    model, spec, windows = _setting("llama")
    passes = PrefixPasses(model, spec, windows)
    with _changed_from(model, spec, 3):
        passes.window_ce(3)
        weight = blocks_of(model, spec)[1].mlp.down_proj.weight
        weight.data[0, 0] += 0.5  # the caller says fp prefix 3, but block 1 changed
        assert np.array_equal(passes.window_ce(3), window_ce(model, windows))
        assert passes.skipped_blocks == passes.batches  # from block 1, the last input still valid
        weight.data[0, 0] -= 0.5
        embed = model.get_input_embeddings().weight
        embed.data[5] *= 1.5
        assert np.array_equal(passes.window_ce(3), window_ce(model, windows))
        assert passes.skipped_blocks == passes.batches  # a full pass


def test_a_peak_recorder_sees_what_a_full_pass_records():
    """Under a peak recorder (Jetson's held-out passes) the skipped blocks' peaks are the ones their
    pass recorded (a passthrough would record its input): the same dictionary as a full recorded
    pass, while the numbers stay exact."""
    model, spec, windows = _setting("llama")
    passes = PrefixPasses(model, spec, windows)
    for k in (4, 2, 4):  # the third pass skips blocks 2-3, which the second ran quantized
        with _changed_from(model, spec, k):
            with PeakRecorder(model) as recorder:
                got = passes.window_ce(k, recorder)
            with PeakRecorder(model) as full:
                expected = window_ce(model, windows)
        assert np.array_equal(got, expected)
        assert recorder.peaks == full.peaks and recorder.summary() == full.summary()
    assert passes.skipped_blocks == (2 + 4) * passes.batches
    passes.window_ce(4)  # without the recorder the attention kernel differs: nothing kept is reused
    assert passes.skipped_blocks == 6 * passes.batches


def test_the_budget_bounds_the_kept_states():
    model, spec, windows = _setting("llama")
    each = windows.size * model.config.hidden_size * 4
    passes = PrefixPasses(model, spec, windows, budget=2 * each)
    with _changed_from(model, spec, 5):
        passes.window_ce(5)
        assert sorted(passes.states) == [4, 5]  # the highest blocks first
        assert np.array_equal(passes.window_ce(5), window_ce(model, windows))
    with _changed_from(model, spec, 3):  # below every kept block: a full pass, nothing more kept
        assert np.array_equal(passes.window_ce(3), window_ce(model, windows))
    assert sorted(passes.states) == [4, 5] and passes.skipped_blocks == 5 * passes.batches
