"""Replicas joining and leaving one consumer group under load: a second replica joins mid-stream, later one is
SIGTERMed, later the other is SIGKILLed and a fresh one started (repeated in the full form). Every input ends
covered, repeats are identical, Redis counts every input once, and no replica that was not killed crashes."""

from __future__ import annotations

import pytest

from tests.faults.harness import image_msgs, pick, wait_progress
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import load_images

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]


@scenario_body("replicas_join_leave")
def scenario_replicas_join_leave(s: Scenario) -> None:
    s.prepare(partitions=4)
    cycles, n = pick(1, 3), pick(240, 1200)
    images = load_images(s.data_dir, "cifar10", "test", n, seed=71)
    running = [s.monitor("rep-0")]
    s.send(image_msgs(images, ["camA", "camB", "camC", "camD", "camE"]))
    total = len(s.sent)
    events = []
    for c in range(cycles):
        lo, span = 0.05 + 0.8 * c / cycles, 0.8 / cycles
        events += [(lo + 0.1 * span, "join"), (lo + 0.4 * span, "sigterm"), (lo + 0.7 * span, "sigkill+start")]
    terminated_rc: dict[str, int] = {}
    killed: list[str] = []
    log = []
    for frac, what in events:
        done = wait_progress(s.outputs, s.sent, int(frac * total), pick(150, 300), alive=tuple(running))
        log.append(f"{what}@{done}")
        if what == "join":
            running.append(s.monitor(f"rep-{len(s.monitors)}"))
        elif what == "sigterm":
            m = running.pop(0)
            terminated_rc[m.instance] = m.terminate(90)
        else:
            m = running.pop(0)
            m.kill()
            killed.append(m.instance)
            running.append(s.monitor(f"rep-{len(s.monitors)}"))
    s.notes.append(f"{' '.join(log)} (of {total}); SIGTERM exit codes {terminated_rc}")
    row, t = s.finish(timeout_s=pick(180, 400), alive=list(running))
    row.alive = bool(row.alive) and all(rc == 0 for rc in terminated_rc.values())
    instances = {r.instance for r in s.outputs.score_recs}
    row.extra.update({"instances_that_scored": sorted(instances), "killed": killed,
                      "sigterm_rc": terminated_rc})
    s.check(row, t)
    assert len(instances) >= 3, f"the replicas shared the work: {instances}"


def test_replicas_join_leave(fault_runner):
    fault_runner.result("replicas_join_leave", RESULT_TIMEOUT_S)
