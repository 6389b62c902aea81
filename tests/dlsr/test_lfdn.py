"""LFDN: shapes, zero-init, the per-timestep dedup trick, per-sample normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlsr.lfdn import LFDN, GroupNorm1, timestep_embedding


def _randomise(model: nn.Module) -> nn.Module:
    """Give the zero-initialised layers random weights so the output depends on every path."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_shapes_and_default_width() -> None:
    model = LFDN(64, n_blocks=2)
    assert (model.width, model.hidden, model.temb_dim) == (128, 128, 128)  # paper: W = W' = 2D
    assert len(model.blocks) == 2
    out = model(torch.randn(10, 64), torch.randint(0, 100, (10,)))
    assert out.shape == (10, 64) and out.dtype == torch.float32


def test_zero_init_output_and_residual_branches() -> None:
    model = LFDN(16, width=32, n_blocks=3)
    assert torch.count_nonzero(model.out.weight) == 0 and torch.count_nonzero(model.out.bias) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.lin2.weight) == 0
    out = model(torch.randn(5, 16), torch.tensor([0, 1, 2, 3, 99]))
    assert torch.equal(out, torch.zeros(5, 16))


def test_dedup_timestep_path_equals_per_sample_computation() -> None:
    model = _randomise(LFDN(32, width=48, n_blocks=3)).eval()
    x = torch.randn(64, 32)
    t = torch.randint(0, 100, (64,))
    with torch.no_grad():
        fast, naive = model(x, t), model(x, t, dedup=False)
        one_fast = model(x, torch.full((64,), 7))
        one_naive = model(x, torch.full((64,), 7), dedup=False)
    assert fast.abs().max() > 0.1  # non-trivial output
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_fast, one_naive, rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_dedup_path() -> None:
    model = _randomise(LFDN(8, width=16, n_blocks=1))
    model(torch.randn(4, 8), torch.tensor([1, 1, 5, 9])).sum().backward()
    assert model.time_mlp[0].weight.grad is not None and model.time_mlp[0].weight.grad.abs().sum() > 0


def test_groupnorm1_matches_torch_groupnorm() -> None:
    ours, ref = GroupNorm1(24), nn.GroupNorm(1, 24)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 24) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_output_of_a_sample_does_not_depend_on_its_batch() -> None:
    model = _randomise(LFDN(16, width=32, n_blocks=2)).eval()
    x, t = torch.randn(9, 16), torch.full((9,), 4)
    with torch.no_grad():
        full = model(x, t)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(9)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-6)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0, 5]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[0, :3], torch.ones(3)) and emb[0, 6] == 0  # cos(0) = 1; odd dim zero-padded
    with pytest.raises(ValueError, match="dim"):
        LFDN(0)
