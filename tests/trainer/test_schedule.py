"""TrainerService on the real Redis with the fake method: reasons to run, one job across trainers, dead holders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from dlsr_monitor.common.hotswap import ModelWatcher
from dlsr_monitor.common.streams import Message
from dlsr_monitor.trainer.history import ABANDONED, PROMOTED, JobRecord
from dlsr_monitor.trainer.intake import VettedIntake
from dlsr_monitor.trainer.schedule import MANUAL, NEW_VETTED, SCHEDULE, TrainerService, request_run

from .conftest import FakeOps, vectors


def service(ctx, **kw) -> TrainerService:
    args = {"interval_s": 3600.0, "min_new_vetted": 100, "lock_ttl_s": 5.0, "progress": False}
    args.update(kw)
    return TrainerService(ctx=ctx, **args)


def test_due_reasons(ctx):
    svc = service(ctx)
    assert svc.due() is None  # empty store: nothing to fit
    ctx.store.add_many(vectors(1000, seed=1))
    assert svc.due() == SCHEDULE  # never ran
    rec = svc.run_once(SCHEDULE)
    assert rec.outcome == PROMOTED
    assert svc.due() is None
    assert svc.due(now=time.time() + 3601) == SCHEDULE
    ctx.redis.incrby(ctx.keys.vetted_new(), 100)
    assert svc.due() == NEW_VETTED
    request_run(ctx.redis, ctx.keys)
    assert svc.due() == MANUAL
    ctx.redis.incrby(ctx.keys.vetted_new(), 7)  # arrivals while the job runs stay counted
    svc.run_once(MANUAL)
    assert svc.due() is None and svc.new_vetted() == 0


class SlowOps(FakeOps):
    def fit(self, features, *, warm_from=None, progress=True):
        time.sleep(0.5)  # long enough for the second trainer to find the lock taken
        return super().fit(features, warm_from=warm_from, progress=progress)


def test_two_trainers_triggered_at_once_run_one_job(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    ctx.ops = SlowOps()
    a, b = service(ctx, owner="a"), service(replace(ctx), owner="b")
    request_run(ctx.redis, ctx.keys)
    barrier = threading.Barrier(2)
    results = {}

    def go(name, svc):
        barrier.wait()
        results[name] = svc.step(timeout_s=0)

    ts = [threading.Thread(target=go, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ran = [r for r in results.values() if r is not None]
    assert len(ran) == 1 and ran[0].outcome == PROMOTED
    assert [r.job_id for r in ctx.history.recent()] == [ran[0].job_id]
    assert a.due() is None and b.due() is None  # the trigger was consumed by the job that ran


def test_trainer_killed_mid_job_lock_expires_and_next_job_runs(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    # A real process takes the lock (TTL 1 s, renewing) and is then SIGKILLed, as a crashed trainer would be.
    code = (
        "import sys,time,redis; sys.path.insert(0, '.');"
        "from trainer.lock import JobLock;"
        f"r=redis.Redis.from_url('redis://127.0.0.1:6379/0'); lk=JobLock(r, {ctx.keys.trainer_lock()!r}, ttl_s=1.0);"
        "assert lk.acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == b"held"
        time.sleep(1.5)  # renewals keep it past its TTL while alive
        svc = service(ctx)
        assert svc.run_once(MANUAL) is None
        ctx.history.save(JobRecord(job_id="dead-job", trigger="manual", start=time.time(), owner="dead"))
        proc.kill()
        proc.wait(10)
        killed = time.time()
        t0 = time.monotonic()
        rec = None
        while rec is None and time.monotonic() - t0 < 5:
            rec = svc.run_once(MANUAL)
            time.sleep(0.05)
        assert rec is not None and rec.outcome == PROMOTED
        assert rec.start - killed <= 1.5  # the next job started within one TTL (1 s) of the death
        dead = ctx.history.get("dead-job")
        assert dead.outcome == ABANDONED and "stopped mid-job" in dead.message
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


class ListSource:
    def __init__(self, msgs):
        self.msgs = list(msgs)
        self.committed = {}

    def poll(self, max_records, timeout_s):
        out, self.msgs = self.msgs[:max_records], self.msgs[max_records:]
        return out

    def commit(self, offsets):
        self.committed.update(offsets)

    def close(self):
        pass


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i, 255 - i, 7)).save(buf, format="PNG")
    return buf.getvalue()


def test_intake_stores_counts_commits_and_feeds_the_live_baseline(ctx):
    ctx.store.add_many(vectors(1000, seed=1))
    fed = []
    ops = ctx.ops

    class ImageOps(FakeOps):  # PNG bytes -> 8 features (mean colour + padding), enough for a live model
        def features(self, images, *, progress=True):
            rows = []
            for it in images:
                if it.data.startswith(b"\x89PNG"):
                    px = np.asarray(Image.open(io.BytesIO(it.data))).reshape(-1, 3).mean(0) / 255.0
                    rows.append(np.concatenate([px, np.zeros(5)]).astype(np.float32))
                else:
                    rows.append(np.frombuffer(it.data[:32], dtype=np.float32))
            return np.stack(rows)

    ctx.ops = ImageOps()
    msgs = [Message("dlsr.vetted", 0, i, png(i), headers=[("source", b"cam-1")]) for i in range(5)]
    msgs.append(Message("dlsr.vetted", 1, 0, b"garbage"))
    msgs.append(Message("dlsr.vetted", 1, 1, png(0)))  # duplicate of an earlier image
    svc = service(
        ctx,
        intake=VettedIntake(ListSource(msgs), ctx.store),
        baseline=lambda v, s: fed.append((v, s)),
        watcher=ModelWatcher(ctx.redis, ctx.keys, ctx.registry.store_root, ops.load),
    )
    assert svc.run_once(MANUAL).outcome == PROMOTED
    assert svc.take_in(0) == 5
    assert svc.intake.rejected == 1 and svc.intake.source.committed == {
        ("dlsr.vetted", 0): 5,
        ("dlsr.vetted", 1): 2,
    }
    assert svc.new_vetted() == 5 and len(ctx.store) == 1005
    ((v, scores),) = fed
    assert v == "v1" and scores.shape == (5,) and np.isfinite(scores).all()
    assert {e.source for e in ctx.store.entries()[-5:]} == {"cam-1"}
