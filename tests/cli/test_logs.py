"""`cli.logs.configure_logging`: the text format unchanged byte for byte, JSON lines with the documented fields,
and real commands writing nothing but JSON on stderr with DLSR_LOG__FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from dlsr_monitor.cli.logs import TEXT_FORMAT, default_instance, make_formatter
from dlsr_monitor.config.settings import LogSettings

ROOT = Path(__file__).resolve().parents[2]
OLD_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what monitor / trainer always printed


def _record(msg: str = "scored %d images", args: tuple = (64,), **extra) -> logging.LogRecord:
    return logging.getLogger("dlsr_monitor.monitor.service").makeRecord(
        "dlsr_monitor.monitor.service", logging.WARNING, __file__, 10, msg, args, None, extra=extra or None
    )


def test_text_format_is_byte_identical_to_the_old_one():
    assert TEXT_FORMAT == OLD_TEXT_FORMAT
    rec = _record(source="cam-7")
    assert make_formatter(LogSettings(format="text")).format(rec) == logging.Formatter(
        OLD_TEXT_FORMAT
    ).format(rec)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failing = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    assert make_formatter(LogSettings()).format(failing) == logging.Formatter(OLD_TEXT_FORMAT).format(failing)


def test_json_lines_carry_level_logger_message_time_instance_and_source():
    fmt = make_formatter(LogSettings(format="json"), instance="monitor-1")
    data = json.loads(fmt.format(_record(source="cam-7")))
    assert data["level"] == "WARNING" and data["logger"] == "dlsr_monitor.monitor.service"
    assert (
        data["message"] == "scored 64 images"
        and data["instance"] == "monitor-1"
        and data["source"] == "cam-7"
    )
    assert datetime.fromisoformat(data["time"]).utcoffset().total_seconds() == 0
    plain = json.loads(make_formatter(LogSettings(format="json")).format(_record()))
    assert (
        "source" not in plain
        and plain["instance"] == default_instance() == f"{socket.gethostname()}-{os.getpid()}"
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failing = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = make_formatter(LogSettings(format="json")).format(failing)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exc_info"]


_SCRIPT = """
import logging, warnings
from dlsr_monitor.cli.logs import configure_logging
from dlsr_monitor.config import load_settings
configure_logging(load_settings(), "INFO")
log = logging.getLogger("dlsr_monitor.probe")
log.info("hello %s", "world", extra={"source": "cam-7"})
log.warning("no source")
warnings.warn("a warning from a library")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it failed")
"""


def _env(**dlsr: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    env.update({"PYTHONPATH": str(ROOT), **dlsr})
    return env


def test_every_stderr_line_is_json_with_the_json_format(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=_env(DLSR_LOG__FORMAT="json"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [r["level"] for r in records] == ["INFO", "WARNING", "WARNING", "ERROR"]
    assert records[0]["source"] == "cam-7" and records[0]["message"] == "hello world"
    assert "source" not in records[1] and records[2]["logger"] == "py.warnings"
    assert "ZeroDivisionError" in records[3]["exc_info"]
    (instance,) = {r["instance"] for r in records}  # hostname-pid of the child
    assert (
        re.fullmatch(rf"{re.escape(socket.gethostname())}-\d+", instance) and instance != default_instance()
    )


def test_the_text_format_stays_the_classic_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO dlsr_monitor.probe: hello world", first
    ), first


@pytest.mark.integration
def test_the_monitor_logs_json_with_its_instance_id(test_settings, tmp_path):
    """`dlsr monitor` as a real process (no model published: it waits for one and says so), SIGTERM; every
    stderr line is JSON and names the instance given by --instance-id."""
    k, r = test_settings.kafka, test_settings.redis
    env = _env(
        DLSR_LOG__FORMAT="json", DLSR_KAFKA__BOOTSTRAP_SERVERS=k.bootstrap_servers,
        DLSR_KAFKA__INPUT_TOPIC=k.input_topic, DLSR_KAFKA__SCORES_TOPIC=k.scores_topic,
        DLSR_KAFKA__ALERTS_TOPIC=k.alerts_topic, DLSR_KAFKA__DLQ_TOPIC=k.dlq_topic, DLSR_REDIS__URL=r.url,
        DLSR_REDIS__PREFIX=r.prefix, DLSR_MODEL__ARTIFACT_STORE=str(tmp_path / "artifacts"), OMP_NUM_THREADS="1",
    )  # fmt: skip
    log_path = tmp_path / "monitor.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dlsr_monitor.cli.main", "monitor", "--instance-id", "json-m1"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "waiting for a model" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "the monitor never said it waits for a model"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert records and {r["instance"] for r in records} == {"json-m1"}
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["message"].startswith("waiting for a model") for r in records)
