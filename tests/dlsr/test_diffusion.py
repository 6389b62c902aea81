"""Diffusion maths: schedule, q_sample, DDIM steps and the reconstruction loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dlsr.diffusion import GaussianDiffusion, ddim_step, ddim_timesteps, make_betas, q_sample


class Oracle(nn.Module):
    """Predicts a fixed x0 whatever the input; counts its calls."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0, self.calls = x0, 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        return self.x0


def test_paper_schedule() -> None:
    betas = make_betas("sqrt_linear", 100)
    assert betas.shape == (100,)
    assert betas[0] == pytest.approx(0.0015) and betas[-1] == pytest.approx(0.0195)
    assert np.allclose(np.sqrt(betas), np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 100))
    diff = GaussianDiffusion(100)
    assert torch.allclose(diff.alphas_cumprod, torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))


def test_unknown_schedule_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="sqrt_linear"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        GaussianDiffusion(10, "nope")


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(5, 5) == [4, 3, 2, 1, 0]
    assert ddim_timesteps(10, 1) == [9]
    assert ddim_timesteps(10, 3) == [9, 5, 0]
    for t in range(1, 21):
        for s in range(1, t + 1):
            seq = ddim_timesteps(t, s)
            assert len(seq) == s and seq[0] == t - 1 and seq[-1] == (0 if s > 1 else t - 1)
            assert all(a > b for a, b in zip(seq, seq[1:], strict=False))
    with pytest.raises(ValueError, match="ddim_steps"):
        ddim_timesteps(3, 4)


def test_q_sample_moments() -> None:
    x0 = torch.full((200_000, 1), 2.0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xk = q_sample(x0, 0.8, 0.6, noise)
    assert float(xk.mean()) == pytest.approx(1.6, abs=0.01)
    assert float(xk.std()) == pytest.approx(0.6, abs=0.01)


def test_deterministic_ddim_step_with_the_true_x0_stays_on_the_forward_path() -> None:
    # With x0_hat = x0 and eta = 0, DDIM keeps the noise direction: x_prev = sqrt(ab') x0 + sqrt(1 - ab') eps.
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ab_k, ab_prev = 0.9, 0.97
    xk = q_sample(x0, ab_k**0.5, (1 - ab_k) ** 0.5, eps)
    out = ddim_step(xk, x0, ab_k, ab_prev, eta=0.0, noise=None)
    torch.testing.assert_close(out, ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps)


def test_reconstruct_with_an_oracle_returns_x0_and_uses_one_call_per_step() -> None:
    diff = GaussianDiffusion(100)
    x0 = torch.randn(3, 5)
    for t, steps in [(1, 1), (5, 5), (10, 3), (10, 1)]:
        oracle = Oracle(x0)
        noise = torch.randn(diff.n_noise(t, steps, 1.0), 5)
        rec = diff.reconstruct(oracle, x0, t, steps, eta=1.0, noise=noise)
        torch.testing.assert_close(rec, x0)
        assert oracle.calls == steps


def test_reconstruct_checks_its_arguments() -> None:
    diff = GaussianDiffusion(10)
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="t must be in"):
        diff.reconstruct(Oracle(x0), x0, 11, 1, 1.0, torch.randn(1, 3))
    with pytest.raises(ValueError, match="noise vectors"):
        diff.reconstruct(Oracle(x0), x0, 5, 5, 1.0, torch.randn(1, 3))


def test_loss_is_zero_for_the_oracle_and_positive_otherwise() -> None:
    diff = GaussianDiffusion(100)
    x0 = torch.randn(8, 4)
    k = torch.randint(0, 100, (8,))
    assert float(diff.loss(Oracle(x0), x0, k, torch.randn(8, 4))) == 0.0
    assert float(diff.loss(Oracle(x0 + 1), x0, k, torch.randn(8, 4))) == pytest.approx(1.0)
