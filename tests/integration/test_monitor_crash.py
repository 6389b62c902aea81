"""SIGKILL the monitor in the middle of a stream and restart it: every input ends with a score record or a dead
letter, replays repeat the same id (and score), and the Redis window counters equal the number of distinct
messages (the per-partition watermark makes replayed effects no-ops)."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from dlsr_monitor.common.contract import DLQ_ORIGIN, parse_score
from dlsr_monitor.console.views import StateView
from tests.integration.conftest import Item, corrupt_payloads, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_IMAGES, N_BAD = 400, 10


def test_sigkill_mid_stream_then_restart_loses_nothing(
    test_settings, published_model, data_dir, tansu, topics, monitors, readers, redis_client, keys
):
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=3)
    images = load_images(data_dir, "cifar10", "test", N_IMAGES, seed=5)
    items = [Item(v, f"cam{i % 2}", "id") for i, v in enumerate(images)]  # default ids: topic:partition:offset
    items += [Item(v, "cam0", "corrupt") for v in corrupt_payloads(N_BAD, images[0])]
    scores, dlq = readers(topics.scores), readers(topics.dlq)

    first = monitors("crashy")
    produce(tansu, topics.input, items, client="confluent")
    wait_until(lambda: len(scores.poll()) >= 120, 300, "the first 120 score records", (first,))
    first.kill()  # SIGKILL mid-stream: no batch finished, nothing committed or cleaned up
    seen_before_restart = len(scores.poll(1.0))
    assert seen_before_restart < N_IMAGES, "the kill must land mid-stream"
    # A kill lands between "records acknowledged" and "offsets committed" only by luck, so make the worst case
    # certain: rewind the committed offsets to 0, as if every commit had been lost. The restart then replays
    # everything that was already scored and counted.
    rewound = _rewind_committed(tansu, test_settings.kafka.group_id, topics.input)
    assert sum(rewound.values()) > 0, rewound

    second = monitors("restarted")
    wait_until(
        lambda: len({(r.partition, r.offset) for r in scores.poll()}) >= N_IMAGES and len(dlq.poll()) >= N_BAD,
        300,
        "every input accounted for after the restart",
        (second,),
    )
    assert second.terminate() == 0
    scores.poll(2.0)
    dlq.poll(2.0)

    recs = [parse_score(r.value) for r in scores.records]
    outcomes: dict[str, list] = defaultdict(list)
    for r in recs:
        outcomes[f"{r.topic}:{r.partition}:{r.offset}"].append(r)
    dead_origins = [dict(r.headers)[DLQ_ORIGIN].decode() for r in dlq.records]
    for origin in dead_origins:
        outcomes[origin].append("dlq")
    assert len(outcomes) == N_IMAGES + N_BAD, "every input has a score record or a dead letter"
    assert set(dead_origins).isdisjoint(r.image_id for r in recs)
    dupes = {k: v for k, v in outcomes.items() if len(v) > 1}
    assert dupes, "the rewound partition must have been replayed"
    for origin, recs_of in dupes.items():
        if recs_of[0] == "dlq":
            assert all(x == "dlq" for x in recs_of)
            continue
        assert {x.image_id for x in recs_of} == {origin}, "a replay carries the same id"
        assert len({round(x.score, 9) for x in recs_of}) == 1, "and the same (deterministic) score"
    print(f"\n{len(recs)} score records for {N_IMAGES} images ({len(dupes)} inputs replayed after SIGKILL); "
          f"{len(dlq.records)} dead letters for {N_BAD} bad payloads")

    state = StateView.from_settings(redis_client, keys, test_settings.monitor)
    images_counted = sum(state.window_totals(s)["images"] for s in ("cam0", "cam1"))
    dead_counted = sum(state.window_totals(s)["dead"] for s in ("cam0", "cam1"))
    assert images_counted == N_IMAGES, "Redis counts each distinct message once, replays included"
    assert dead_counted == N_BAD
    assert sum(state.window_totals(s)["ood"] for s in ("cam0", "cam1")) == len(
        {(r.partition, r.offset) for r in recs if r.is_ood}
    )


def _rewind_committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Join the group as its only member (once the killed one timed out) and commit offset 0 everywhere.
    Returns the committed offsets it replaced, per partition."""
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                      session_timeout_ms=10000)
    try:
        c.subscribe([topic])
        parts = c.partitions_for_topic(topic)
        deadline = time.monotonic() + 90
        while len(c.assignment()) < len(parts):
            assert time.monotonic() < deadline, "could not join the group to rewind it"
            c.poll(timeout_ms=500, max_records=1)
        before = {tp.partition: c.committed(tp) or 0 for tp in c.assignment()}
        c.commit({tp: OffsetAndMetadata(0, "", -1) for tp in c.assignment()})
        assert all(c.committed(tp) == 0 for tp in c.assignment())
        return before
    finally:
        c.close(autocommit=False)
