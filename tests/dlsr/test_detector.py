"""DLSRDetector and DLSRConfig: separation, determinism, named errors, warm start, bf16 training, the config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr.detector import DLSRConfig, DLSRDetector
from dlsr.exceptions import FeatureWidthError, NotFittedError
from dlsr.metrics import auroc
from tests.dlsr._synthetic import BOUNDARIES, TINY, D, clusters


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models are dominated by thread hand-offs on a busy 2-core box; one thread is faster and stable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters()


@pytest.fixture(scope="module")
def fitted(data: tuple[np.ndarray, np.ndarray]) -> DLSRDetector:
    x_id, _ = data
    return DLSRDetector(t=5, **TINY).fit(x_id[:800])


@pytest.mark.parametrize("score", ["mse", "mfsim5", "mfsim4"])
def test_separates_two_clusters(
    fitted: DLSRDetector, data: tuple[np.ndarray, np.ndarray], score: str
) -> None:
    x_id, x_ood = data
    assert auroc(fitted.score(x_id[800:], score=score), fitted.score(x_ood, score=score)) > 0.9


def test_training_loss_goes_down(fitted: DLSRDetector) -> None:
    assert len(fitted.history) == 12 and fitted.history[-1] < 0.8 * fitted.history[0]
    assert fitted.n_train == 800 and fitted.dim == D and fitted.boundaries == BOUNDARIES


@pytest.mark.parametrize("n_draws", [1, 2])
def test_scores_do_not_depend_on_batch_size_or_composition(
    data: tuple[np.ndarray, np.ndarray], fitted: DLSRDetector, n_draws: int
) -> None:
    det = fitted
    if n_draws != 1:
        det = DLSRDetector(t=5, n_draws=n_draws, **{**TINY, "epochs": 1}).fit(data[0][:200])
    x = np.concatenate([data[0][800:900], data[1][:60]])
    ref = det.score(x, batch_size=64)
    for bs in (1, 7, 64, 1000):
        np.testing.assert_allclose(det.score(x, batch_size=bs), ref, rtol=1e-6, atol=0)
    perm = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_allclose(det.score(x[perm], batch_size=7)[np.argsort(perm)], ref, rtol=1e-6, atol=0)
    # Another batch mate changes nothing either; and calling again gives the same numbers.
    mixed = np.concatenate([x[:5], data[1][200:205]])
    np.testing.assert_allclose(det.score(mixed)[:5], ref[:5], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(det.score(x, batch_size=64), ref)


def test_every_sample_is_scored_including_the_last_partial_batch(fitted: DLSRDetector) -> None:
    x = clusters(n_id=301, n_ood=1)[0]
    s = fitted.score(x, batch_size=100)
    assert s.shape == (301,) and np.all(np.isfinite(s))


def test_score_all_matches_single_scores_and_settings_override(fitted: DLSRDetector, data) -> None:
    x = data[0][800:850]
    allv = fitted.score_all(x, t=3)
    for name in ("mse", "mfsim5", "mfsim4"):
        np.testing.assert_allclose(allv[name], fitted.score(x, score=name, t=3), rtol=1e-12)
    assert not np.allclose(fitted.score(x, t=3), fitted.score(x, t=8))
    one = fitted.score(x, t=8, ddim_steps=1)
    assert one.shape == (50,) and not np.allclose(one, fitted.score(x, t=8))


def test_fit_is_reproducible_and_leaves_the_global_rng_alone(data) -> None:
    state = torch.random.get_rng_state()
    a = DLSRDetector(seed=3, dropout=0.1, **{**TINY, "epochs": 2}).fit(data[0][:300])
    assert torch.equal(torch.random.get_rng_state(), state)
    b = DLSRDetector(seed=3, dropout=0.1, **{**TINY, "epochs": 2}).fit(data[0][:300])
    for (ka, va), (_, vb) in zip(a.state_tensors().items(), b.state_tensors().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_warm_start_continues_from_the_current_weights(data) -> None:
    det = DLSRDetector(**{**TINY, "epochs": 3}).fit(data[0][:300])
    first = det.history[-1]
    before = {k: v.clone() for k, v in det.state_tensors().items()}
    det.fit(data[0][300:600], warm_start=True, epochs=2, lr=5e-4)
    assert len(det.history) == 5 and det.n_train == 600
    assert det.history[3] < det.history[0] and det.history[-1] <= first * 1.2
    assert any(not torch.equal(before[k], v) for k, v in det.state_tensors().items())
    with pytest.raises(FeatureWidthError, match="D'=32"):
        DLSRDetector(**{**TINY, "boundaries": None, "epochs": 1}).fit(data[0][:50]).fit(
            data[0][:50, :32], warm_start=True
        )


def test_named_errors_tell_the_fix(fitted: DLSRDetector, data) -> None:
    x = data[0][:10]
    fresh = DLSRDetector(**TINY)
    with pytest.raises(NotFittedError, match=r"call fit\(\) first"):
        fresh.score(x)
    with pytest.raises(NotFittedError, match=r"call fit\(\) first"):
        fresh.save("/nonexistent/never")
    with pytest.raises(FeatureWidthError, match=r"got D'=32 .* fitted on D=64 features from an unnamed"):
        fitted.score(x[:, :32])
    with pytest.raises(FeatureWidthError, match="2-D"):
        fitted.score(x[0])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        fitted.calibrate(x, alpha=1.5)
    with pytest.raises(ValueError, match="unknown score"):
        DLSRDetector(score="lr")
    with pytest.raises(ValueError, match="t must be in"):
        DLSRDetector(t=0)
    with pytest.raises(ValueError, match="ddim_steps must be in"):
        DLSRDetector(t=3, ddim_steps=4)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        DLSRDetector(schedule="foo")
    with pytest.raises(ValueError, match="needs at least 2 layers"):
        DLSRDetector(score="mfsim4", boundaries=(0, 64))
    with pytest.raises(FeatureWidthError, match="boundaries"):
        DLSRDetector(**TINY).fit(np.zeros((10, 60), dtype=np.float32))
    with pytest.raises(ValueError, match="strictly increasing"):
        DLSRDetector(boundaries=(0, 8, 8, 64))
    with pytest.raises(ValueError, match="NaN"):
        DLSRDetector(**TINY).fit(np.full((10, 64), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        fitted.score()
    with pytest.raises(ValueError, match="no encoder"):
        fitted.score(images=[Image.new("RGB", (4, 4))])


def test_bf16_training_on_cpu_learns(data) -> None:
    det = DLSRDetector(train_amp=True, **{**TINY, "epochs": 4}).fit(data[0][:400])
    assert det.history[-1] < det.history[0]
    assert next(det.model.parameters()).dtype == torch.float32  # fp32 master weights; scoring stays fp32
    assert np.all(np.isfinite(det.score(data[1][:10])))


# The paper's LFDN and scorer (docs/METHOD.md section 2): what DLSRDetector() saves; a change here changes manifests.
PAPER_HYPERPARAMETERS = {
    "score": "mfsim5", "t": 5, "ddim_steps": None, "eta": 1.0, "n_draws": 1, "n_blocks": 16, "width": None,
    "hidden": None, "temb_dim": None, "dropout": 0.0, "T": 100, "schedule": "sqrt_linear", "epochs": 150,
    "batch_size": 256, "lr": 0.001, "weight_decay": 0.02, "ema_decay": 0.999, "warmup_steps": 0, "seed": 0,
    "score_amp": False, "train_amp": None, "min_batch": 16, "score_batch_size": 1024, "encode_batch_size": 64,
}  # fmt: skip


def test_config_defaults_are_the_papers_and_hyperparameters_are_the_config() -> None:
    det = DLSRDetector()
    assert det.hyperparameters() == PAPER_HYPERPARAMETERS
    assert list(det.hyperparameters()) == list(PAPER_HYPERPARAMETERS)  # the order too
    assert dataclasses.asdict(det.config) == {
        k: v for k, v in det.hyperparameters().items() if k not in ("score_batch_size", "encode_batch_size")
    }
    assert DLSRConfig().lr is None and det.config == DLSRConfig(lr=0.001)  # lr=None: 1e-3 x batch / 256
    assert DLSRDetector(batch_size=512).config.lr == 0.002


def test_keyword_and_config_forms_build_the_same_detector(data) -> None:
    by_kwargs = DLSRDetector(t=4, seed=2, **{**TINY, "epochs": 1})
    config = DLSRConfig(t=4, seed=2, n_blocks=2, width=64, epochs=1, batch_size=128)
    by_config = DLSRDetector(config=config, boundaries=BOUNDARIES, progress=False)
    assert by_kwargs.config == by_config.config == config.resolved()
    assert by_kwargs.hyperparameters() == by_config.hyperparameters()
    a, b = by_kwargs.fit(data[0][:200]), by_config.fit(data[0][:200])
    np.testing.assert_array_equal(a.score(data[1][:20]), b.score(data[1][:20]))
    # Keywords replace the config's fields; numbers are kept in their canonical types.
    both = DLSRDetector(config=config, n_blocks=3, eta=1, t=3.0)
    assert (both.config.n_blocks, both.config.t, both.config.width) == (3, 3, 64)
    assert type(both.config.eta) is float and type(both.config.t) is int
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_block'"):
        DLSRDetector(n_block=3)


def test_config_is_frozen_validated_and_replaced() -> None:
    config = dataclasses.replace(DLSRConfig(), n_blocks=8, epochs=20)
    assert (config.n_blocks, config.epochs, config.t) == (8, 20, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.t = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="t must be in"):
        dataclasses.replace(config, t=101)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        DLSRConfig(schedule="foo")
    with pytest.raises(ValueError, match="min_batch must be >= 1"):
        DLSRConfig(min_batch=0)


def test_hyperparameter_attributes_read_and_replace_the_config() -> None:
    det = DLSRDetector(n_blocks=3, score="mse")
    assert (det.n_blocks, det.score_name, det.lr, det.T) == (3, "mse", 0.001, 100)
    for f in dataclasses.fields(DLSRConfig):  # every field, under its own name (score: score_name)
        assert getattr(det, "score_name" if f.name == "score" else f.name) == getattr(det.config, f.name)
    det.epochs = 7  # the attribute form (e.g. the trainer's refit settings) replaces the config
    assert det.config.epochs == 7 and det.hyperparameters()["epochs"] == 7
    det.config = dataclasses.replace(det.config, T=50, t=2)
    assert (det.T, det.t, det.diffusion.T) == (50, 2, 50)  # the diffusion follows T and the schedule
    with pytest.raises(ValueError, match="t must be in"):
        det.t = 0
    with pytest.raises(ValueError, match="needs at least 2 layers"):
        DLSRDetector(boundaries=(0, 64)).score_name = "mfsim4"
    assert det.t == 2


def test_estimate_fit_times_the_real_step_and_leaves_the_detector_alone(data):
    x, _ = data
    det = DLSRDetector(**{**TINY, "epochs": 7, "batch_size": 64})
    est = det.estimate_fit(1000, D)
    assert est.steps == 7 * 16 and est.epochs == 7  # ceil(1000 / 64) = 16 steps an epoch
    assert est.step_s > 0 and est.seconds == pytest.approx(est.steps * est.step_s)
    assert 1 <= est.probe_steps <= 3
    assert not det.is_fitted and det.history == []  # the probe trained a throw-away copy
    line = est.line(det.config, "cpu")
    assert "\n" not in line and line.startswith("estimated LFDN fit: ") and "112 steps x" in line
    refit = det.fit(x).estimate_fit(1000, D, epochs=2)  # a warm refit's fewer epochs
    assert refit.steps == 2 * 16 and det.is_fitted


def test_estimate_fit_probe_is_bounded_by_its_budget():
    det = DLSRDetector(**TINY)
    assert det.estimate_fit(10_000, D, budget_s=0.0).probe_steps == 1  # a slow warm-up: one timed step
