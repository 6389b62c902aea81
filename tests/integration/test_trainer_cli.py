"""The trainer's CLI end to end on the real Redis and Tansu: fit from a folder, list, jobs, promote, rollback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def dlsr(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlsr_monitor.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )


@pytest.fixture
def env(tansu, redis_url, prefix, topics, keys, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    (tmp_path / "empty.toml").write_text("")
    e.update(
        {
            "DLSR_CONFIG_FILE": str(tmp_path / "empty.toml"),
            "DLSR_KAFKA__BOOTSTRAP_SERVERS": tansu,
            "DLSR_KAFKA__ALERTS_TOPIC": topics.alerts,
            "DLSR_KAFKA__VETTED_TOPIC": topics.vetted,
            "DLSR_KAFKA__CONNECT_RETRIES": "2",
            "DLSR_REDIS__URL": redis_url,
            "DLSR_REDIS__PREFIX": prefix,
            "DLSR_MODEL__ARTIFACT_STORE": str(tmp_path / "store"),
            "DLSR_MODEL__FEATURE_CACHE": str(tmp_path / "cache"),
            "DLSR_MODEL__INPUT_SIZE": "64",
            "DLSR_MODEL__DEVICE": "cpu",
            "DLSR_MODEL__ALPHA": "0.05",
            "DLSR_TRAINER__WORKDIR": str(tmp_path / "vetted"),
            "DLSR_TRAINER__DETECTOR": json.dumps({"n_blocks": 2, "epochs": 2}),
            "DLSR_TRAINER__REFERENCE_SIZE": "30",
        }
    )
    return e


def test_fit_list_jobs_promote_rollback(env, data_dir, tmp_path):
    folder = tmp_path / "imgs"
    with zipfile.ZipFile(data_dir / "cifar10" / "train.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[:300]
        for n in names:
            (folder / n).parent.mkdir(parents=True, exist_ok=True)
            (folder / n).write_bytes(zf.read(n))
    (folder / "airplane" / "broken.jpg").write_bytes(b"not a jpeg")

    r = dlsr(env, "trainer", "fit", "--data", str(folder), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "300 new vetted images" in r.stdout and "1 unreadable" in r.stdout
    assert "promoted -> v1" in r.stdout
    # The fit-time estimate comes before the fit, as one line with a number (from a timed probe of the step).
    estimate = [line for line in r.stderr.splitlines() if "estimated LFDN fit:" in line]
    assert len(estimate) == 1 and re.search(r"fit: \d+(\.\d)? (s|min|h) \(\d+ steps x \d+ ms", estimate[0])

    r = dlsr(env, "trainer", "fit", "--data", str(folder), "--quiet")  # same data again: a warm refit, v2
    assert r.returncode == 0, r.stderr
    assert "0 new vetted images, 300 already stored" in r.stdout and "promoted -> v2" in r.stdout

    listing = json.loads(dlsr(env, "model", "list", "--json").stdout)
    assert listing["current"] == "v2"
    assert [v["version"] for v in listing["versions"]] == ["v1", "v2"]
    assert (
        listing["versions"][1]["parent"] == "v1" and listing["versions"][1]["data_sizes"]["warm_start"] == 1
    )

    jobs = [json.loads(line) for line in dlsr(env, "jobs", "--json").stdout.splitlines()]
    assert [j["outcome"] for j in jobs] == ["promoted", "promoted"] and jobs[0]["trigger"] == "fit"
    assert "false_alarm" in jobs[0]["gates"]
    assert all(j["timings"]["fit_estimate_s"] > 0 for j in jobs)  # the promise, next to fit_s
    assert dlsr(env, "jobs").returncode == 0

    r = dlsr(env, "model", "rollback")
    assert r.returncode == 0 and "live model v1" in r.stdout
    r = dlsr(env, "model", "rollback")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no earlier version" in r.stderr
    r = dlsr(env, "model", "promote", "v9")
    assert r.returncode == 1 and "not registered" in r.stderr
    r = dlsr(env, "model", "promote", "v2", "--expect", "v2")
    assert r.returncode == 1 and "expected v2" in r.stderr
    assert dlsr(env, "model", "promote", "v2", "--expect", "v1").returncode == 0
    assert dlsr(env, "trainer", "trigger").returncode == 0
    r = dlsr(env, "trainer", "fit", "--data", str(tmp_path / "missing"))
    assert r.returncode == 1 and "not found" in r.stderr


def test_service_takes_in_vetted_runs_on_trigger_and_stops_on_sigterm(
    env, data_dir, tmp_path, redis_client, keys
):
    import signal
    import time

    from kafka import KafkaProducer

    folder = tmp_path / "imgs"
    with zipfile.ZipFile(data_dir / "cifar10" / "train.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        for n in names[:300]:
            (folder / n).parent.mkdir(parents=True, exist_ok=True)
            (folder / n).write_bytes(zf.read(n))
        vetted = [zf.read(n) for n in names[300:320]]
    assert dlsr(env, "trainer", "fit", "--data", str(folder), "--quiet").returncode == 0

    env = {**env, "DLSR_TRAINER__POLL_S": "0.3", "DLSR_TRAINER__MIN_NEW_VETTED": "1000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlsr_monitor.trainer", "--log-level", "INFO"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seeded = redis_client.llen(keys.baseline("v1"))  # calibration + held-out scores of v1, from the fit
    assert seeded > 0
    try:
        producer = KafkaProducer(bootstrap_servers=env["DLSR_KAFKA__BOOTSTRAP_SERVERS"], acks="all")
        for data in vetted:
            producer.send(env["DLSR_KAFKA__VETTED_TOPIC"], value=data)
        producer.send(env["DLSR_KAFKA__VETTED_TOPIC"], value=b"not an image")
        producer.flush(30)
        producer.close()
        deadline = time.monotonic() + 240
        while int(redis_client.get(keys.vetted_new()) or 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert int(redis_client.get(keys.vetted_new()) or 0) == 20  # the bad message is refused, not counted
        # the live model scored the new vetted images into its baseline reservoir
        while redis_client.llen(keys.baseline("v1")) < seeded + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert redis_client.llen(keys.baseline("v1")) == seeded + 20

        assert dlsr(env, "trainer", "trigger").returncode == 0
        while time.monotonic() < deadline:
            jobs = [json.loads(x) for x in dlsr(env, "jobs", "--json").stdout.splitlines()]
            if jobs and jobs[0]["trigger"] == "manual" and jobs[0]["outcome"] != "running":
                break
            time.sleep(1.0)
        assert jobs[0]["trigger"] == "manual" and jobs[0]["outcome"] == "promoted", jobs[0]
        assert jobs[0]["data_sizes"]["total"] == 320 and jobs[0]["version"] == "v2"
        assert int(redis_client.get(keys.vetted_new()) or 0) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        finally:
            proc.kill()
            err = proc.stderr.read()
            proc.stderr.close()
    assert rc == 0, err[-2000:]
