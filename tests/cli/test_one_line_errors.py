"""What used to be a traceback (or nothing) is one line on stderr and exit 2 (a setting) or 1 (a server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlsr_monitor.cli.main import main

DLSR = Path(sys.executable).with_name("dlsr")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _run(monkeypatch, capsys, argv: list[str], **env: str) -> tuple[int, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DLSR_MODEL__STAGES": "1,2"}, "model.stages (env DLSR_MODEL__STAGES) (got '1,2'): not a JSON list"),
        ({"DLSR_TRAINER__DETECTOR": "n_blocks=8"}, "trainer.detector (env DLSR_TRAINER__DETECTOR)"),
        ({"DLSR_MODEL__DEVICE": "gpu"}, "model.device (env DLSR_MODEL__DEVICE) (got 'gpu')"),
        ({"DLSR_MODEL__ENCODER": "resnet999"}, "timm has no model 'resnet999'"),
        ({"DLSR_MODEL__STAGES": "[1,9]"}, "stage indices must be within 0..4"),
    ],
)
def test_bad_model_settings_are_one_line_exit_2(monkeypatch, capsys, env, expected):
    rc, err = _run(monkeypatch, capsys, ["config", "show"], **env)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dlsr: invalid setting") and expected in err, err


@pytest.mark.parametrize("bootstrap", ["", "host:"])
def test_alerts_with_an_empty_or_portless_bootstrap_is_one_line_exit_2(monkeypatch, capsys, bootstrap):
    rc, err = _run(monkeypatch, capsys, ["alerts", "--timeout", "1"], DLSR_KAFKA__BOOTSTRAP_SERVERS=bootstrap)
    assert rc == 2
    assert err.count("\n") == 1 and "kafka.bootstrap_servers (env DLSR_KAFKA__BOOTSTRAP_SERVERS)" in err, err


def test_a_bad_value_in_dlsr_toml_names_the_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "dlsr.toml").write_text("[model]\nalpha = 2\n")
    rc, err = _run(monkeypatch, capsys, ["config", "show"])
    assert rc == 2
    assert err == "dlsr: dlsr.toml: model.alpha (got 2): Input should be less than 1\n"


def test_alerts_without_a_broker_is_one_line_exit_1_within_the_retry_budget(tmp_path):
    from dlsr_monitor.demo.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    env.update(
        DLSR_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        DLSR_KAFKA__CONNECT_RETRIES="2",
        DLSR_KAFKA__RETRY_BACKOFF_S="0.2",
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(DLSR), "alerts", "--timeout", "10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dlsr: error: Kafka at 127.0.0.1:"), (
        proc.stderr
    )
    assert "unreachable after 2 tries" in proc.stderr
    assert time.monotonic() - t0 < 30


def test_config_show_into_a_closed_pipe_is_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    for fmt in ("json", "env"):
        # `dlsr config show | head -1`: the reader goes away after the first line.
        proc = subprocess.run(
            f"{DLSR} config show --format {fmt} | head -1; echo rc=${{PIPESTATUS[0]}} >&2",
            shell=True,
            executable="/bin/bash",
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stdout.count("\n") == 1
        assert proc.stderr.strip() == "rc=0", (
            proc.stderr
        )  # no BrokenPipeError traceback, no "Exception ignored"
    # A reader that takes nothing at all.
    proc = subprocess.Popen([str(DLSR), "config", "show"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "", err
