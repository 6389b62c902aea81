"""The reconstruction scores: values on hand-made features, the layer layout, and score-name checks."""

from __future__ import annotations

import pytest
import torch

from dlsr.scores import SCORES, _segments, check_score_name, mfsim4_score, mfsim5_score, mse_score

BOUNDS = (0, 2, 4, 7)  # three layers of 2, 2 and 3 dims


def test_segments_are_the_layers() -> None:
    assert _segments(BOUNDS) == [(0, 2), (2, 4), (4, 7)]


def test_mse_is_the_mean_squared_error_in_float64() -> None:
    z0 = torch.zeros(2, 7)
    rec = torch.tensor([[1.0] * 7, [0.0] * 6 + [7.0]])
    s = mse_score(z0, rec, BOUNDS)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([1.0, 7.0], dtype=torch.float64))


def test_mfsim_is_minus_the_mean_per_layer_cosine() -> None:
    z0 = torch.ones(1, 7)
    # Layer 1 reversed (cosine -1), layer 2 orthogonal (0), layer 3 scaled (1).
    rec = torch.tensor([[-1.0, -1.0, 1.0, -1.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(mfsim5_score(z0, rec, BOUNDS), torch.tensor([0.0], dtype=torch.float64))
    torch.testing.assert_close(mfsim4_score(z0, rec, BOUNDS), torch.tensor([-0.5], dtype=torch.float64))
    perfect = mfsim5_score(z0, z0.clone(), BOUNDS)
    torch.testing.assert_close(perfect, torch.tensor([-1.0], dtype=torch.float64))


def test_scores_rank_worse_reconstructions_higher() -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(50, 7, generator=g)
    noise = torch.randn(50, 7, generator=g)
    for name, fn in SCORES.items():
        good, bad = fn(z0, z0 + 0.1 * noise, BOUNDS), fn(z0, z0 + 2.0 * noise, BOUNDS)
        assert good.shape == (50,) and bool((bad > good).float().mean() > 0.9), name


def test_score_names_are_checked_against_the_layout() -> None:
    assert sorted(SCORES) == ["mfsim4", "mfsim5", "mse"]
    assert check_score_name("mfsim4", BOUNDS) == "mfsim4" and check_score_name("mse", (0, 7)) == "mse"
    with pytest.raises(ValueError, match=r"unknown score 'lr'; choose one of \['mfsim4', 'mfsim5', 'mse'\]"):
        check_score_name("lr")
    with pytest.raises(ValueError, match="needs at least 2 layers"):
        check_score_name("mfsim4", (0, 7))
