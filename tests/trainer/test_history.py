"""JobHistory on the real Redis: round trip, newest first, trimming."""

from __future__ import annotations

from dlsr_monitor.trainer.history import PROMOTED, REJECTED, JobHistory, JobRecord


def test_round_trip_and_order(rkeys):
    client, keys = rkeys
    h = JobHistory(client, keys, keep=3)
    for i in range(5):
        h.save(
            JobRecord(
                job_id=f"j{i}",
                trigger="schedule",
                start=100.0 + i,
                outcome=PROMOTED,
                duration_s=1.5,
                data_sizes={"fit": i},
                gates={"finite": {"passed": True}},
                version=f"v{i}",
            )
        )
    recent = h.recent(10)
    assert [r.job_id for r in recent] == ["j4", "j3", "j2"]  # trimmed to keep=3, newest first
    assert client.exists(keys.trainer_job("j0")) == 0
    assert recent[0].data_sizes == {"fit": 4} and recent[0].duration_s == 1.5 and recent[0].version == "v4"
    assert h.last_start() == 104.0


def test_failed_gates_listed(rkeys):
    client, keys = rkeys
    h = JobHistory(client, keys)
    h.save(
        JobRecord(
            job_id="x",
            trigger="manual",
            start=1.0,
            outcome=REJECTED,
            gates={"finite": {"passed": True}, "false_alarm": {"passed": False, "value": 0.3}},
        )
    )
    assert h.get("x").failed_gates() == ["false_alarm"]
    assert h.get("nope") is None
    assert h.last_start((PROMOTED,)) is None
