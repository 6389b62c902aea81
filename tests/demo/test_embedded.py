import pytest

from dlsr_monitor.demo.embedded import (
    EmbeddedRedis,
    TansuBroker,
    broker_ready,
    ensure_redis,
    free_port,
    redis_reachable,
)

pytestmark = pytest.mark.integration


def test_tansu_starts_answers_metadata_and_stops():
    broker = TansuBroker().start()
    try:
        assert broker_ready(broker.bootstrap)
    finally:
        broker.stop()
    assert not broker_ready(broker.bootstrap, timeout_s=1.0)


def test_ensure_redis_returns_a_reachable_url_or_starts_one(redis_url):
    assert ensure_redis(redis_url) == (redis_url, None)
    url, server = ensure_redis(f"redis://127.0.0.1:{free_port()}/0")  # nothing there: an embedded one
    try:
        assert server is not None and redis_reachable(url)
    finally:
        server.stop()
    assert not redis_reachable(url, 0.5)


def test_embedded_redis_stop_is_idempotent():
    server = EmbeddedRedis()
    server.start()
    server.stop()
    server.stop()
