"""The key layout: one prefix per deployment, hash-tagged into one Cluster slot when asked."""

from redis.cluster import RedisCluster, key_slot

from dlsr_monitor.common.keys import Keys
from dlsr_monitor.config.settings import RedisSettings
from tests.conftest import CLUSTER


def test_plain_keys_are_unchanged_and_cluster_keys_share_one_slot():
    plain, tagged = Keys("dlsr"), Keys.of(RedisSettings(prefix="dlsr", cluster=True))
    assert plain.model_current() == "dlsr:model:current" and plain.all_pattern() == "dlsr:*"
    assert tagged.model_current() == "{dlsr}:model:current" and tagged.all_pattern() == "{dlsr}:*"
    names = [tagged.watermark("g", "images", 3), tagged.sources(), tagged.recent_alerts(),
             tagged.window_bucket("cam-1", 28_000_000), tagged.drift("cam-2"), tagged.model_entry("v9"),
             tagged.baseline("v9"), tagged.trainer_lock(), tagged.heartbeat("m1")]
    assert len({key_slot(n.encode()) for n in names}) == 1


def test_the_cluster_runs_are_on_a_real_cluster(redis_client, keys):
    """In the cluster pass of the test command the fixtures really are a three-master Redis Cluster."""
    assert isinstance(redis_client, RedisCluster) == CLUSTER and keys.cluster == CLUSTER
    if CLUSTER:
        assert len(redis_client.get_primaries()) == 3
