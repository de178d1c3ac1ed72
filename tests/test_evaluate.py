"""Per-window cross-entropy and the paired dCE bound that measured repair compares with its target."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qublast.evaluate import ce_shift, perplexity, token_ce, window_ce
from tests.tiny import tiny_model


def test_window_ce_matches_perplexity():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(5, 16), dtype=np.int64)
    per_window = window_ce(model, windows, batch_size=2)
    assert per_window.shape == (5,)
    total = perplexity(model, windows, batch_size=3)
    # every window predicts the same number of tokens, so the mean of window means is the mean
    assert math.exp(per_window.mean()) == pytest.approx(total.ppl, rel=1e-6)
    with torch.no_grad():
        first = model(input_ids=torch.from_numpy(windows[:1])).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(first, torch.from_numpy(windows[0, 1:])).item()
    assert per_window[0] == pytest.approx(expected, rel=1e-5)
    per_token = token_ce(model, windows, batch_size=3)
    # every predicted token, in window order across batches, averaging to the window means
    assert per_token.shape == (5, 15)
    assert per_token.astype(np.float64).mean(axis=1) == pytest.approx(per_window, rel=1e-12)
    assert per_token[0].mean() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 50 * 4, 16 << 20])
def test_token_ce_a_few_rows_at_a_time_equals_one_call_over_all_rows(monkeypatch, chunk_bytes):
    """Row chunks (one row, three rows with a ragged last chunk, all rows) give the per-token
    values one cross-entropy call over the flattened logits gives, bit for bit."""
    import qublast.evaluate as evaluate

    monkeypatch.setattr(evaluate, "CE_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 17, 50, generator=g) * 4, torch.randint(0, 50, (2, 17), generator=g)
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    assert torch.equal(evaluate._next_token_ce(logits, ids), flat.view(2, 16))


def test_ce_shift_is_paired_with_window_stderr():
    before = np.array([3.0, 3.5, 2.0, 4.0])
    after = before + np.array([0.01, 0.03, 0.02, 0.04])
    shift = ce_shift(after, before)
    assert shift.mean == pytest.approx(0.025)
    # stderr of the differences, not of the raw CEs (which spread far more)
    assert shift.stderr == pytest.approx(np.std([0.01, 0.03, 0.02, 0.04], ddof=1) / 2)
    assert shift.upper(2.0) == pytest.approx(0.025 + 2 * shift.stderr)
    assert ce_shift(after[:1], before[:1]).upper(2.0) == math.inf
