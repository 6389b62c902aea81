import threading
import time

import pytest

from dlsr_monitor.monitor.budget import ByteBudget


def test_reservations_never_exceed_the_limit():
    budget = ByteBudget(100)
    seen = []

    def work():
        got = budget.reserve(40)
        seen.append(budget.in_use)
        time.sleep(0.01)
        budget.release(got)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert max(seen) <= 100 and budget.peak <= 100 and budget.in_use == 0


def test_a_request_larger_than_the_budget_runs_alone():
    budget = ByteBudget(100)
    small = budget.reserve(30)
    done = threading.Event()

    def big():
        got = budget.reserve(10_000)  # clipped to the limit: waits until the small one is back
        done.set()
        budget.release(got)

    t = threading.Thread(target=big)
    t.start()
    assert not done.wait(0.1)
    budget.release(small)
    assert done.wait(2)
    t.join(2)


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        ByteBudget(0)
