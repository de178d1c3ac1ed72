"""benchmarks/asym_probe.py's asymmetric grid: what it claims to compare is a real 16-level grid."""
import torch

from benchmarks.asym_probe import asymmetric, block_for, symmetric


def test_block_is_the_cpu_w4_choice():
    assert block_for(576) == 64 and block_for(1536) == 128 and block_for(48) == 16


def test_asymmetric_reproduces_a_weight_on_its_grid():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every block spans the whole grid
    scale = torch.tensor(0.125)  # fp16-exact
    zero = 3.0
    w = (codes - zero) * scale
    assert torch.equal(asymmetric(w, 64), w)


def test_asymmetric_uses_16_levels_per_block():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(16, 128, generator=g) * 3 - 0.5  # skewed: mostly positive
    deq = asymmetric(w, 64)
    for block in deq.reshape(16, 2, 64).flatten(0, 1):
        assert len(torch.unique(block)) <= 16
    assert (deq - w).pow(2).mean() < (symmetric(w, 64) - w).pow(2).mean()


def test_asymmetric_gptq_keeps_an_on_grid_weight_and_lowers_the_output_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 128, generator=g) * torch.rand(128, generator=g) * 2
    h = 2 * x.T @ x / x.shape[0]
    codes = torch.randint(0, 16, (8, 128), generator=g).float()
    codes[:, 0], codes[:, 1], codes[:, 64], codes[:, 65] = 0, 15, 0, 15
    on_grid = (codes - 5.0) * 0.25
    assert torch.equal(asymmetric(on_grid, 64, h), on_grid)
    w = torch.randn(32, 128, generator=g)
    rtn, gptq = asymmetric(w, 64), asymmetric(w, 64, h)
    assert (x @ (gptq - w).T).pow(2).mean() < (x @ (rtn - w).T).pow(2).mean()
