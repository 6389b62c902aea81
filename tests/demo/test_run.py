"""`dlsr demo`: data resolution, the stream it sends, and a reduced end-to-end run on real servers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from dlsr_monitor.config.errors import StartupError
from dlsr_monitor.demo.run import (
    CORRUPT_SOURCE,
    ID_SOURCE,
    OOD_SOURCE,
    DemoData,
    DemoOptions,
    build_stream,
    resolve_data,
    run_demo,
)


def test_missing_data_says_exactly_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr("dlsr_monitor.demo.run._shared_data_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(StartupError) as info:
        resolve_data(None, None)
    msg = str(info.value)
    assert "--id-data" in msg and "--ood-data" in msg and "\n" not in msg
    with pytest.raises(StartupError, match="--id-data .*does not exist"):
        resolve_data(tmp_path / "nope", tmp_path)


def test_resolve_shared_layout(data_dir):
    data = resolve_data(data_dir / "cifar10", data_dir)
    assert data.id_train.name == "train.zip" and data.id_test.name == "test.zip"
    assert {p.parent.name for p in data.ood} == {"tiny_imagenet", "mnist"}
    single = resolve_data(data_dir / "cifar10" / "test.zip", data_dir / "mnist" / "test.zip")
    assert single.id_train == single.id_test and single.ood == (data_dir / "mnist" / "test.zip",)


def test_stream_switches_two_sources_after_a_clean_start(data_dir):
    data = DemoData(data_dir / "cifar10" / "train.zip", data_dir / "cifar10" / "test.zip",
                    (data_dir / "tiny_imagenet" / "test.zip", data_dir / "mnist" / "test.zip"))
    items = build_stream(data, 20)
    assert len(items) == 60
    assert [it.source for it in items[:3]] == [ID_SOURCE, OOD_SOURCE, CORRUPT_SOURCE]  # round robin
    by = {s: [it.kind.split(":")[0] for it in items if it.source == s] for s in (ID_SOURCE, OOD_SOURCE, CORRUPT_SOURCE)}
    assert set(by[ID_SOURCE]) == {"id"}
    for src, bad in ((OOD_SOURCE, "ood"), (CORRUPT_SOURCE, "corrupt")):
        clean = by[src].index(bad)
        assert 0 < clean < 20 and set(by[src][clean:]) == {bad}
    ood_sets = Counter(it.kind for it in items if it.kind.startswith("ood:"))
    assert set(ood_sets) == {"ood:tiny_imagenet", "ood:mnist"}
    assert len({it.image_id for it in items}) == 60
    assert build_stream(data, 20)[-1].data == items[-1].data  # deterministic
    # Every source draws from all classes (the subset comes sorted by class folder: unshuffled, cam-id took the
    # first classes only, whose false-alarm rate is not alpha).
    classes = Counter(it.image_id.split("/")[2] for it in build_stream(data, 150) if it.source == ID_SOURCE)
    assert len(classes) == 10 and max(classes.values()) < 40


@pytest.mark.integration
@pytest.mark.slow
def test_quick_demo_end_to_end(data_dir, test_settings, redis_client, tmp_path):
    """Reduced demo on real servers: the demo starts its own Tansu (nothing answers at the configured address),
    uses the test Redis, fits, runs the monitor, draws a dashboard frame and summarises."""
    from dlsr_monitor.demo.embedded import broker_ready, free_port

    dead = f"127.0.0.1:{free_port()}"
    settings = test_settings.model_copy(
        update={
            "kafka": test_settings.kafka.model_copy(update={"bootstrap_servers": dead}),
            "demo": test_settings.demo.model_copy(update={"workdir": tmp_path / "demo"}),
        }
    )
    opts = DemoOptions.from_settings(
        settings, id_data=data_dir / "cifar10", ood_data=data_dir, quick=True, json_path=tmp_path / "summary.json"
    )
    console = Console(record=True, width=140, force_terminal=False)
    rc = run_demo(settings, opts, console=console)
    text = console.export_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    by = {s["source"]: s for s in summary["sources"]}
    assert by[OOD_SOURCE]["flagged"] and by[CORRUPT_SOURCE]["flagged"], text
    assert not by[ID_SOURCE]["flagged"], text
    assert rc == 0
    assert summary["images_scored"] == summary["images_sent"] == 3 * opts.images
    assert summary["drift_alerts"] >= 2 and summary["throughput_img_s"] > 0
    assert by[OOD_SOURCE]["ood_rate"] > 3 * by[ID_SOURCE]["ood_rate"]
    assert "started a" not in summary["started"].get("redis", "")  # the reachable test Redis was used
    assert "Tansu" in summary["started"]["kafka"]
    # The dashboard frame it drew, then the summary table.
    assert re.search(r"estimated LFDN fit: \d", text), text  # before the fit, from a timed probe
    assert "DLSR Monitor" in text and "Sources" in text and "RAISED" in text and "DLSR demo summary" in text
    # It stopped what it started and left no keys behind.
    bootstrap = summary["started"]["kafka"].rsplit(" ", 1)[-1]
    assert not broker_ready(bootstrap, timeout_s=2.0)
    assert summary["run_id"]
    assert not list(redis_client.scan_iter(f"demo-{summary['run_id']}:*", count=1000))
    assert Path(tmp_path / "demo" / "features").is_dir()  # features cached for the next run


@pytest.mark.integration
def test_stream_only_feeds_the_configured_topic(data_dir, test_settings):
    """`dlsr demo --stream-only` (the compose producer): the three sources land on the input topic with headers."""
    from kafka import KafkaConsumer

    opts = DemoOptions.from_settings(
        test_settings, id_data=data_dir / "cifar10", ood_data=data_dir, images=10, stream_only=True
    )
    opts.rate_img_s = 0.0
    assert run_demo(test_settings, opts, console=Console(record=True)) == 0
    kafka = test_settings.kafka
    consumer = KafkaConsumer(
        kafka.input_topic, auto_offset_reset="earliest", consumer_timeout_ms=5000, **kafka.client_kwargs()
    )
    try:
        records = list(consumer)
    finally:
        consumer.close()
    assert len(records) == 30
    sources = Counter(dict(r.headers)["source"].decode() for r in records)
    assert sources == {ID_SOURCE: 10, OOD_SOURCE: 10, CORRUPT_SOURCE: 10}
    assert all(dict(r.headers).get("image_id") and dict(r.headers).get("ts") for r in records)
