"""JobLock on the real Redis: exclusivity, expiry of a dead holder, renewal, token-checked release."""

from __future__ import annotations

import threading
import time

import pytest

from dlsr_monitor.trainer.lock import JobLock, LockLostError


def test_only_one_holder_and_release_frees_it(rkeys):
    client, keys = rkeys
    a = JobLock(client, keys.trainer_lock(), ttl_s=5, owner="a")
    b = JobLock(client, keys.trainer_lock(), ttl_s=5, owner="b")
    assert a.acquire()
    assert not b.acquire()
    assert a.holder() == a.token
    assert a.release()
    assert b.acquire()
    b.release()


def test_dead_holder_expires_after_ttl(rkeys):
    client, keys = rkeys
    # a holder that "dies": takes the lock without a keep-alive thread (as a killed process would leave it)
    client.set(keys.trainer_lock(), "dead:holder", px=300)
    nxt = JobLock(client, keys.trainer_lock(), ttl_s=5, owner="next")
    assert not nxt.acquire()
    time.sleep(0.4)
    assert nxt.acquire()
    nxt.release()


def test_holder_renews_past_its_ttl(rkeys):
    client, keys = rkeys
    a = JobLock(client, keys.trainer_lock(), ttl_s=0.3, owner="a")
    assert a.acquire()
    time.sleep(0.8)  # more than twice the TTL: renewal keeps it
    assert a.holder() == a.token
    a.check()
    assert a.release()


def test_expired_holder_cannot_delete_successor_and_knows_it_lost(rkeys):
    client, keys = rkeys
    a = JobLock(client, keys.trainer_lock(), ttl_s=5, owner="a")
    assert a.acquire()
    a._stop.set()  # stop renewing, then simulate expiry and a successor taking over
    client.delete(keys.trainer_lock())
    b = JobLock(client, keys.trainer_lock(), ttl_s=5, owner="b")
    assert b.acquire()
    assert not a.renew()
    with pytest.raises(LockLostError, match="lost"):
        a.check()
    assert not a.release()  # token mismatch: b's lock stays
    assert b.holder() == b.token
    b.release()


def test_concurrent_acquire_one_wins(rkeys):
    client, keys = rkeys
    locks = [JobLock(client, keys.trainer_lock(), ttl_s=5, owner=f"t{i}") for i in range(8)]
    barrier = threading.Barrier(len(locks))
    won = []

    def go(lk: JobLock) -> None:
        barrier.wait()
        if lk.acquire():
            won.append(lk)

    ts = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(won) == 1
    won[0].release()
