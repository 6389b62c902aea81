"""A poison model: a registered artifact whose weights are NaN. `dlsr model promote` must refuse it (checks on
promote, `--force` to override), so the running monitor keeps scoring with the good version.

Expected to fail until those checks exist: while `dlsr model promote --help` has no `--force` and the promote
goes through, the scenario runs to the end (nothing may be lost either way) and is then marked xfail with the
reason (it is not skipped)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.harness import image_msgs, pick, wait_progress
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import load_images

ROOT = Path(__file__).resolve().parents[2]
DLSR = [sys.executable, "-c", "import sys; from dlsr_monitor.cli.main import main; sys.exit(main())"]


def _promote_has_force() -> bool:
    try:
        out = subprocess.run([*DLSR, "model", "promote", "--help"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--force" in out.stdout


HAS_FORCE = _promote_has_force()

XFAIL_REASON = ("model checks on promote are not built yet: `dlsr model promote --help` has no --force, and a "
                "NaN-weight artifact is promoted like any other")

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]


def nan_artifact(src: Path, dest: Path) -> Path:
    """A copy of a saved detector with every floating-point weight NaN (manifest checksums updated, so it
    verifies: the poison is in the numbers, not in the files)."""
    import torch
    from safetensors.torch import load_file, save_file

    from dlsr.artifacts import file_sha256

    shutil.copytree(src, dest)
    weights = dest / "weights.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
              str(weights))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = file_sha256(weights)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dest


@scenario_body("poison_model")
def scenario_poison_model(s: Scenario) -> None:
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.common.registry import Registry

    s.prepare(partitions=3)
    good = s.model.version
    mon = s.monitor("poison-model")
    images = load_images(s.data_dir, "cifar10", "test", pick(40, 200), seed=91)
    half = len(images) // 2
    s.send(image_msgs(images[:half], ["camN"]))
    wait_progress(s.outputs, s.sent, len(s.sent), 120, alive=(mon,))

    client = redis.Redis.from_url(s.redis_url)
    try:
        reg = Registry(client, Keys(s.prefix), s.tmp_path / "artifacts")
        bad = reg.register(nan_artifact(s.small_model.path, s.tmp_path / "nan-model"), threshold=s.small_model.threshold,
                           alpha=s.small_model.alpha).version
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DLSR_")}
        env.update({"DLSR_REDIS__URL": s.redis_url, "DLSR_REDIS__PREFIX": s.prefix,
                    "DLSR_MODEL__ARTIFACT_STORE": str(s.tmp_path / "artifacts"), "PYTHONPATH": str(ROOT)})
        out = subprocess.run([*DLSR, "model", "promote", bad], capture_output=True, text=True, timeout=120,
                             cwd=s.tmp_path, env=env)
        live_after = reg.current_version()
    finally:
        client.close()
    s.send(image_msgs(images[half:], ["camN"]))
    refused = out.returncode != 0 and live_after == good
    s.notes.append(f"promote {bad} (NaN weights): rc={out.returncode} "
                   f"{(out.stdout + out.stderr).strip()[-160:]!r}; live after: {live_after}")
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])
    versions = sorted({r.model_version for r in s.outputs.score_recs})
    not_finite = sum(d["reason"] == "score_not_finite" for d in s.outputs.dead_recs)
    row.extra.update({"promote_rc": out.returncode, "live_after": live_after, "scored_with": versions,
                      "score_not_finite": not_finite})
    row.notes += f"; scored with {versions}, {not_finite} score_not_finite dead letters"
    s.check(row, t)  # whatever promote did, no input may be lost (a loss is a failure, never an xfail)
    if not refused and not HAS_FORCE:
        pytest.xfail(XFAIL_REASON)
    assert refused, f"`dlsr model promote {bad}` accepted a NaN-weight artifact (rc {out.returncode}): {out.stdout}"
    assert versions == [good] and not_finite == 0


def test_poison_model(fault_runner):
    fault_runner.result("poison_model", RESULT_TIMEOUT_S)
