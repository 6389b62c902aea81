from dlsr_monitor.common.streams import Message, SinkError
from dlsr_monitor.common.testing import MemorySink, MemorySource
from dlsr_monitor.monitor.batching import collect_batch


def _msgs(n, partition=0):
    return [Message("t", partition, i, b"x") for i in range(n)]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_batch_stops_at_size_cap():
    src = MemorySource(_msgs(10))
    batch = collect_batch(src.poll, batch_max=4, wait_s=10.0)
    assert [m.offset for m in batch] == [0, 1, 2, 3]


def test_batch_stops_at_deadline_after_first_message():
    clock = FakeClock()
    calls = []

    def poll(max_records, timeout):
        calls.append((max_records, timeout))
        clock.t += 0.05  # each poll takes 50 ms of (fake) time
        return [Message("t", 0, len(calls), b"x")] if len(calls) % 2 else []

    batch = collect_batch(poll, batch_max=100, wait_s=0.2, clock=clock)
    assert 1 < len(batch) < 100
    assert clock.t <= 0.05 + 0.2 + 0.05  # never waits past the deadline by more than one poll
    assert all(max_records <= 100 for max_records, _ in calls)


def test_empty_source_returns_empty_batch():
    assert collect_batch(MemorySource().poll, batch_max=8, wait_s=0.1, idle_s=0.01) == []


def test_memory_source_commit_and_rewind():
    src = MemorySource(_msgs(5))
    src.poll(5, 0)
    src.commit({("t", 0): 3})
    src.rewind_to_committed()
    assert [m.offset for m in src.poll(10, 0)] == [3, 4]


def test_memory_sink_only_keeps_flushed_records():
    sink = MemorySink(fail_next_flush=True)
    sink.send("a", None, b"1")
    try:
        sink.flush(1)
        raise AssertionError("flush should fail")
    except SinkError:
        pass
    sink.send("a", b"k", b"2")
    sink.flush(1)
    assert [r.value for r in sink.on("a")] == [b"2"]
