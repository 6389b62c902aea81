"""A job end to end on the fake method and real Redis: publish, warm start, gate failures recorded."""

from __future__ import annotations

import numpy as np

from dlsr.calibration import pac_rank
from dlsr_monitor.trainer.history import FAILED, PROMOTED, REJECTED
from dlsr_monitor.trainer.job import min_calibration, run_job

from .conftest import vectors


def test_first_job_publishes_v1_with_entry_alert_and_baseline(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == PROMOTED, rec.message
    assert rec.version == "v1" and rec.parent is None
    assert ctx.registry.current_version() == "v1"
    entry = ctx.registry.entry("v1")
    assert entry.data_sizes["fit"] == rec.data_sizes["fit"] > 600
    assert entry.gates["false_alarm"]["passed"] and entry.gates["finite"]["passed"]
    assert entry.gates["reference_shift"]["value"] is None  # nothing to compare with yet
    assert np.isfinite(entry.threshold) and entry.alpha == 0.05
    # The product default: a pac threshold, and the entry says so (JobConfig from DLSR_MODEL__CALIBRATION).
    assert (entry.calibration, entry.delta) == ("pac", 0.1)
    cal = np.sort(ctx.ops.load(ctx.registry.artifact_path(entry)).calibration_scores)
    assert entry.threshold == cal[pac_rank(cal.size, 0.05, 0.1) - 1]
    ctx.registry.verify(entry)
    assert [a.version for a in ctx.alerts] == ["v1"] and ctx.alerts[0].event == "live"
    ((v, seed),) = ctx.baseline
    assert v == "v1" and len(seed) == rec.data_sizes["calibration"] + rec.data_sizes["holdout"]
    stored = ctx.history.get(rec.job_id)
    assert stored.outcome == PROMOTED and stored.duration_s > 0 and stored.gates == rec.gates


def test_second_job_warm_starts_and_names_parent(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    assert run_job(ctx, "manual", progress=False).outcome == PROMOTED
    ctx.store.add_many(vectors(200, seed=2))
    rec = run_job(ctx, "new_vetted", progress=False)
    assert rec.outcome == PROMOTED, rec.message
    assert (rec.version, rec.parent) == ("v2", "v1")
    assert ctx.ops.fits == [False, True]
    assert rec.data_sizes["fresh_holdout"] < rec.data_sizes["holdout"]
    assert "false_alarm_fresh" in rec.gates
    assert ctx.registry.previous_versions() == ["v1"]


def test_nan_scores_fail_the_finite_gate_and_keep_the_candidate(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    assert run_job(ctx, "manual", progress=False).outcome == PROMOTED
    ctx.ops.nan = True
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == REJECTED
    assert ctx.history.get(rec.job_id).failed_gates() == ["finite"]
    assert "finite" in rec.message and "NaN" in rec.message
    assert ctx.registry.current_version() == "v1"
    assert (ctx.registry.store_root / "rejected" / rec.job_id).is_dir()


def test_shifted_data_fails_the_reference_gate_by_a_stated_margin(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    assert run_job(ctx, "manual", progress=False).outcome == PROMOTED
    ctx.store.add_many(vectors(4000, seed=3, scale=3.0))  # "vetted" data far wider than before
    rec = run_job(ctx, "new_vetted", progress=False)
    assert rec.outcome == REJECTED, rec.message
    g = ctx.history.get(rec.job_id).gates["reference_shift"]
    assert not g["passed"] and g["value"] > g["bound"] == 0.1
    assert "exceeds by" in g["detail"]
    assert ctx.registry.current_version() == "v1"


def test_false_alarm_gate_catches_a_miscalibrated_threshold(ctx, monkeypatch):
    ctx.store.add_many(vectors(2000, seed=1))
    from tests.trainer.conftest import FakeDetector

    real = FakeDetector.calibrate

    def too_low(self, features=None, *, scores=None, alpha, **calibration):  # at the median: ~50% false alarms
        real(self, features, scores=scores, alpha=alpha, **calibration)
        self.threshold = float(np.median(self.calibration_scores))
        return self

    monkeypatch.setattr(FakeDetector, "calibrate", too_low)
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == REJECTED
    assert rec.gates["false_alarm"]["passed"] is False and rec.gates["false_alarm"]["value"] > 0.3
    assert ctx.registry.current_version() is None


def test_too_little_data_fails_with_a_clear_message(ctx):
    ctx.store.add_many(vectors(30, seed=1))
    rec = run_job(ctx, "manual", progress=False)
    assert rec.outcome == FAILED
    assert f"alpha=0.05 with delta=0.1 (pac) needs at least {min_calibration(0.05, 'pac', 0.1)}" in rec.message
    ctx.store = type(ctx.store)(ctx.registry.store_root / "empty")
    empty = run_job(ctx, "manual", progress=False)
    assert empty.outcome == FAILED and "no vetted images" in empty.message
