"""Registry against the real local Redis: publish, compare-and-set, rollback, content-addressed store."""

from __future__ import annotations

import threading

import pytest

from dlsr_monitor.common.registry import (
    PointerConflictError,
    Registry,
    RegistryError,
    VersionNotFoundError,
    artifact_digest,
)
from dlsr_monitor.common.testing import make_artifact


@pytest.fixture
def reg(rkeys, tmp_path) -> Registry:
    client, keys = rkeys
    return Registry(client, keys, tmp_path / "store")


def test_publish_stores_by_digest_and_moves_pointer(reg, tmp_path):
    src = make_artifact(tmp_path, "a", b"one")
    digest = artifact_digest(src)
    e1 = reg.publish(
        src, threshold=1.5, alpha=0.01, data_sizes={"fit": 10}, gates={"nan": {"passed": True}}, expected=None
    )
    assert e1.version == "v1"
    assert e1.sha256 == digest
    assert (reg.store_root / digest / "weights.safetensors").read_bytes() == b"one"
    assert reg.current_version() == "v1"
    got = reg.entry("v1")
    assert got.threshold == 1.5 and got.alpha == 0.01
    assert got.data_sizes == {"fit": 10} and got.gates == {"nan": {"passed": True}}
    assert got.parent is None and got.created > 0
    assert reg.verify(got) == reg.store_root / digest


def test_entries_record_their_guarantee_and_old_entries_read_as_marginal(reg, rkeys, tmp_path):
    client, keys = rkeys
    e = reg.publish(make_artifact(tmp_path, "a", b"one"), threshold=1.0, alpha=0.05, calibration="pac", delta=0.1)
    assert (e.calibration, e.delta) == ("pac", 0.1) and reg.entry(e.version).as_dict()["calibration"] == "pac"
    e2 = reg.publish(make_artifact(tmp_path, "b", b"two"), threshold=1.0, alpha=0.05)
    assert (e2.calibration, e2.delta) == ("marginal", None)
    client.hdel(keys.model_entry(e.version), "calibration", "delta")  # an entry written before the fields
    assert (reg.entry(e.version).calibration, reg.entry(e.version).delta) == ("marginal", None)


def test_versions_are_monotone_and_listed_in_order(reg, tmp_path):
    for i in range(11):
        reg.register(make_artifact(tmp_path, f"a{i}", bytes([i])), threshold=1.0, alpha=0.01)
    assert [e.version for e in reg.list_versions()] == [f"v{i}" for i in range(1, 12)]
    assert reg.current_version() is None  # register alone does not promote


def test_compare_and_set_refuses_a_stale_expectation(reg, tmp_path):
    reg.publish(make_artifact(tmp_path, "a", b"1"), threshold=1, alpha=0.01, expected=None)
    v2 = reg.register(make_artifact(tmp_path, "b", b"2"), threshold=1, alpha=0.01, parent="v1")
    v3 = reg.register(make_artifact(tmp_path, "c", b"3"), threshold=1, alpha=0.01, parent="v1")
    reg.promote(v2.version, expected="v1")
    with pytest.raises(PointerConflictError) as err:
        reg.promote(v3.version, expected="v1")
    assert err.value.actual == "v2"
    assert reg.current_version() == "v2"
    # publish with a stale parent: registered (for inspection) but not current
    with pytest.raises(PointerConflictError):
        reg.publish(make_artifact(tmp_path, "d", b"4"), threshold=1, alpha=0.01, expected="v1")
    assert reg.current_version() == "v2"
    assert [e.version for e in reg.list_versions()][-1] == "v4"


def test_concurrent_promotes_only_one_wins(reg, tmp_path):
    reg.publish(make_artifact(tmp_path, "a", b"1"), threshold=1, alpha=0.01, expected=None)
    cands = [
        reg.register(make_artifact(tmp_path, f"c{i}", bytes([i + 10])), threshold=1, alpha=0.01)
        for i in range(6)
    ]
    wins, losses = [], []
    barrier = threading.Barrier(len(cands))

    def go(v: str) -> None:
        barrier.wait()
        try:
            reg.promote(v, expected="v1")
            wins.append(v)
        except PointerConflictError:
            losses.append(v)

    threads = [threading.Thread(target=go, args=(c.version,)) for c in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    assert reg.current_version() == wins[0]


def test_rollback_walks_back_and_then_refuses(reg, tmp_path):
    for i in range(3):
        reg.publish(make_artifact(tmp_path, f"a{i}", bytes([i])), threshold=float(i), alpha=0.01)
    assert reg.current_version() == "v3"
    assert reg.previous_versions() == ["v2", "v1"]
    assert reg.rollback().version == "v2"
    assert reg.rollback(expected="v2").version == "v1"
    assert reg.current_version() == "v1"
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback()
    # a promote after a rollback pushes the rolled-back-to version, so rollback returns to it
    reg.promote("v3")
    assert reg.rollback().version == "v1"


def test_rollback_with_stale_expectation_is_refused(reg, tmp_path):
    for i in range(2):
        reg.publish(make_artifact(tmp_path, f"a{i}", bytes([i])), threshold=1, alpha=0.01)
    with pytest.raises(PointerConflictError):
        reg.rollback(expected="v1")
    assert reg.current_version() == "v2"


def test_unknown_version_and_missing_artifact(reg, tmp_path):
    with pytest.raises(VersionNotFoundError):
        reg.promote("v9")
    with pytest.raises(VersionNotFoundError):
        reg.entry("v9")
    with pytest.raises(RegistryError, match="not found"):
        reg.store_artifact(tmp_path / "nope")


def test_same_content_stored_once_and_flipped_byte_fails_verify(reg, tmp_path):
    a = make_artifact(tmp_path, "a", b"same")
    b = make_artifact(tmp_path, "b", b"same")
    (b / "manifest.json").write_text((a / "manifest.json").read_text())
    d1, p1 = reg.store_artifact(a)
    d2, p2 = reg.store_artifact(b)
    assert d1 == d2 and p1 == p2
    assert [p.name for p in reg.store_root.iterdir()] == [d1]  # no temp dirs left behind
    e = reg.publish(a, threshold=1, alpha=0.01)
    w = reg.artifact_path(e) / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[0] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="checksum"):
        reg.verify(e)


def test_keep_rejected_moves_candidate_aside(reg, tmp_path):
    src = make_artifact(tmp_path, "cand", b"bad")
    kept = reg.keep_rejected(src, "job-1")
    assert kept == reg.store_root / "rejected" / "job-1"
    assert (kept / "weights.safetensors").read_bytes() == b"bad" and not src.exists()


def test_a_registry_lost_with_redis_is_rebuilt_from_the_store(rkeys, tmp_path):
    client, keys = rkeys
    reg = Registry(client, keys, tmp_path / "store")
    assert reg.ensure_epoch() and not reg.ensure_epoch()  # set once; present afterwards
    reg.publish(make_artifact(tmp_path, "a", b"one"), threshold=1.0, alpha=0.01)
    reg.publish(make_artifact(tmp_path, "b", b"two"), threshold=2.0, alpha=0.02)
    reg.rollback()  # v1 is live again
    before = {e.version: (e.sha256, e.threshold, e.alpha) for e in reg.list_versions()}
    for name in client.scan_iter(keys.all_pattern()):  # what a Redis restarted without persistence holds
        client.delete(name)
    assert reg.current_version() is None
    assert reg.ensure_epoch()  # the epoch is gone: the state was wiped
    assert reg.recover() == "v1"
    assert {e.version: (e.sha256, e.threshold, e.alpha) for e in reg.list_versions()} == before
    assert reg.current_version() == "v1"
    assert reg.recover() is None  # never over an existing registry
