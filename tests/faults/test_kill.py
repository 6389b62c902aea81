"""SIGKILL the monitor at seeded random points of a stream, restart it, repeat: every input ends with a score
record or a dead letter, replays repeat the same id and score, Redis counts every input once."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.faults.harness import Msg, image_msgs, pick, wait_progress
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import corrupt_payloads, load_images

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]

SEED = int(os.environ.get("DLSR_FAULTS_SEED", "20240611"))


@scenario_body("sigkill")
def scenario_sigkill(s: Scenario) -> None:
    s.prepare(partitions=3, broker="private")  # private: some kills freeze it first (see below)
    rng = random.Random(SEED)
    n_images, n_bad, kills = pick(200, 720), pick(10, 30), pick(2, 6)
    images = load_images(s.data_dir, "cifar10", "test", n_images, seed=51)
    msgs = image_msgs(images, ["cam0", "cam1", "cam2"])
    bad = [Msg(v, b"cam0", [("source", b"cam0")], None, "bad") for v in corrupt_payloads(n_bad, images[0])]
    for i, m in enumerate(bad):  # spread the bad ones through the stream
        msgs.insert((i + 1) * len(msgs) // (n_bad + 1), m)
    env = {"DLSR_MONITOR__BATCH_MAX": 8}  # more, smaller batches: more distinct points to land a kill on
    mon = s.monitor("kill-0", **env)
    s.send(msgs)
    total = len(s.sent)
    # Kill points: progress (inputs with an outcome) in 10 %..70 % of the stream. Even kills: a random 0..0.6 s
    # later, anywhere in poll / decode / score / Redis / produce / commit. Odd kills: right after a batch's
    # records reached the broker, with the broker frozen so the commit cannot finish first (a window of
    # milliseconds otherwise): the restarted monitor must replay that batch with the same ids and scores.
    points = sorted(rng.sample(range(int(0.10 * total), int(0.70 * total)), kills))
    landed: list[int] = []
    for i, point in enumerate(points):
        # Each incarnation makes some progress before it dies (else a kill point already passed would only ever
        # kill a monitor still starting up).
        goal = max(point, (landed[-1] + 1) if landed else 0)
        if goal >= total:
            s.notes.append(f"only {i} kills: the stream was done")
            break
        done = wait_progress(s.outputs, s.sent, goal, pick(120, 240), alive=(mon,))
        assert done >= goal, f"no progress to {goal} before kill {i + 1}"
        if done >= total:
            s.notes.append(f"only {i} kills: the stream was done")
            break
        if i % 2 == 0:  # anywhere: a random 0..0.6 s later
            time.sleep(rng.uniform(0.0, 0.6))
            s.outputs.poll(0.1)
            landed.append(len(s.sent & s.outputs.covered()))
            mon.kill()
        else:  # in the produce -> commit window: freeze the broker the moment a batch's records appear
            _kill_while_committing(s, mon)
            landed.append(len(s.sent & s.outputs.covered()))
        mon = s.monitor(f"kill-{i + 1}", **env)
    s.notes.append(f"seed {SEED}; kills after {landed} of {total} inputs had an outcome (odd kills in the "
                   f"produce->commit window)")
    s.extra["kill_points"] = landed
    row, t = s.finish(timeout_s=pick(150, 300), alive=None)
    s.check(row, t)
    assert t.dead == n_bad, (t.dead, n_bad)
    assert all(r.image_id == f"{r.topic}:{r.partition}:{r.offset}" for r in s.outputs.score_recs)


def test_sigkill(fault_runner):
    fault_runner.result("sigkill", RESULT_TIMEOUT_S)


def _kill_while_committing(s: Scenario, mon) -> None:
    """SIGKILL `mon` between "records acknowledged" and "offsets committed": wait for new score records, then
    SIGSTOP the broker (the commit hangs), SIGKILL the monitor, SIGCONT the broker."""
    import os
    import signal

    pid = s.broker.proc.pid
    seen = len(s.outputs.scores.records)
    deadline = time.monotonic() + 60
    while len(s.outputs.scores.poll(0.02)) == seen and time.monotonic() < deadline:
        mon.check_alive()
        if s.sent <= s.outputs.poll(0.01).covered():
            break  # nothing left to produce: kill it as it is
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        mon.kill()
    finally:
        os.kill(pid, signal.SIGCONT)
    s.outputs.poll(0.1)
