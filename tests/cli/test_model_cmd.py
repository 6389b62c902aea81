"""`dlsr model promote / rollback` run the model checks before the pointer moves (real Redis, tmp store)."""


import numpy as np
import pytest
import torch

from dlsr.baselines import MahalanobisDetector
from dlsr_monitor.cli.main import main
from dlsr_monitor.common.registry import Registry


@pytest.fixture
def registry(redis_url, rkeys, tmp_path, monkeypatch):
    client, keys = rkeys
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)  # away from any dlsr.toml
    monkeypatch.setenv("DLSR_REDIS__URL", redis_url)
    monkeypatch.setenv("DLSR_REDIS__PREFIX", keys.prefix)
    monkeypatch.setenv("DLSR_MODEL__ARTIFACT_STORE", str(store))
    return Registry(client, keys, store)


def _artifact(tmp_path, name, *, nan=False):
    rng = np.random.default_rng(0)
    det = MahalanobisDetector(progress=False).fit(rng.standard_normal((200, 8)).astype(np.float32))
    det.calibrate(rng.standard_normal((100, 8)).astype(np.float32), alpha=0.05)
    if nan:
        next(t for t in det.state_tensors().values() if t.is_floating_point() and t.numel() > 1).view(-1)[0] = torch.nan
    return det.save(tmp_path / name), det.threshold


def test_promote_refuses_nan_weights_unless_forced_and_records_who(registry, tmp_path, capsys):
    good, t = _artifact(tmp_path, "good")
    bad, _ = _artifact(tmp_path, "bad", nan=True)
    registry.publish(good, threshold=t, alpha=0.05)
    registry.register(bad, threshold=t, alpha=0.05)
    assert main(["model", "promote", "v2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and "not finite" in err and "--force" in err
    assert registry.current_version() == "v1"  # the pointer never moved
    assert main(["model", "promote", "v2", "--force", "--by", "ana"]) == 0
    assert registry.current_version() == "v2"
    forced = registry.entry("v2").forced
    assert forced["by"] == "ana" and forced["action"] == "promote" and forced["problems"]


def test_rollback_checks_the_version_it_returns_to(registry, tmp_path, capsys):
    bad, t = _artifact(tmp_path, "bad", nan=True)
    good, _ = _artifact(tmp_path, "good")
    registry.register(bad, threshold=t, alpha=0.05)
    registry.promote("v1")
    registry.publish(good, threshold=t, alpha=0.05)
    assert main(["model", "rollback"]) == 1
    assert "model v1 refused" in capsys.readouterr().err
    assert registry.current_version() == "v2"
