"""`dlsr demo`: the whole product on an embedded default, from a bare machine to a summary.

Starts what is not running (a Tansu broker in memory; Redis at the configured URL when it answers, else an
embedded one), fits a quick DLSR model on a CIFAR-10 subset (features cached), publishes it to the registry,
starts a monitor (a thread in this process, through the same `run_monitor` as `dlsr monitor`), streams three
sources (cam-id: CIFAR-10 test; cam-ood: CIFAR-10 then Tiny-ImageNet and MNIST; cam-corrupt: CIFAR-10 then
corrupted CIFAR-10), draws the dashboard while it runs, prints a summary and stops what it started.

The summary is counted from the product's own outputs: score records and alerts read back from the broker.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from dlsr_monitor.config.errors import StartupError

if TYPE_CHECKING:
    from dlsr_monitor.common.registry import Registry
    from dlsr_monitor.config.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)

ID_SOURCE, OOD_SOURCE, CORRUPT_SOURCE = "cam-id", "cam-ood", "cam-corrupt"
SOURCES = (ID_SOURCE, OOD_SOURCE, CORRUPT_SOURCE)
OOD_SETS = ("tiny_imagenet", "mnist")
#: What cam-corrupt sends once it breaks: code-made corruptions (dlsr.corruptions) stacked at their strongest
#: severity, a camera that failed (washed out, noisy, out of focus) rather than a mild drift.
CORRUPTIONS = (
    ("contrast", "gaussian_noise"),
    ("gaussian_noise", "gaussian_noise"),
    ("contrast", "contrast"),
    ("pixelate", "gaussian_blur", "contrast"),
)
CORRUPT_SEVERITY = 5
#: The share of each source's stream that is clean CIFAR-10 before cam-ood and cam-corrupt switch.
CLEAN_SHARE = 0.3

DATA_HINT = (
    "pass --id-data PATH (a folder with CIFAR-10 train.zip and test.zip, or one zip/folder of in-distribution "
    "images) and --ood-data PATH (a folder with tiny_imagenet/test.zip and mnist/test.zip, or one zip/folder of "
    "OOD images); by default they come from ../shared/data"
)


# ----------------------------------------------------------------------------------------------------------
# options and data


@dataclass
class DemoOptions:
    """What one demo run does; built from `settings.demo` and the command line."""

    id_data: Path | None = None
    ood_data: Path | None = None
    quick: bool = False
    images: int = 600  # per source
    fit_images: int = 3000
    input_size: int = 64
    epochs: int = 15
    blocks: int = 4  # a small LFDN: the demo shows the product, `dlsr bench ood` measures the method
    width: int = 512
    alpha: float = 0.05
    rate_img_s: float = 30.0  # 0 = as fast as the monitor scores
    dashboard: bool = True
    json_path: Path | None = None
    stream_only: bool = False
    workdir: Path = Path(".cache/dlsr/demo")
    max_inflight: int = 96  # produced but not yet scored: keeps the dashboard live instead of lagging

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        id_data: Path | None = None,
        ood_data: Path | None = None,
        quick: bool = False,
        images: int | None = None,
        dashboard: bool = True,
        json_path: Path | None = None,
        stream_only: bool = False,
    ) -> DemoOptions:
        demo = settings.demo
        opts = cls(
            id_data=id_data or demo.id_data,
            ood_data=ood_data or demo.ood_data,
            quick=quick,
            images=demo.stream_images,
            fit_images=demo.fit_images,
            input_size=demo.input_size,
            alpha=demo.alpha,
            rate_img_s=demo.rate_img_s,
            dashboard=dashboard,
            json_path=json_path,
            stream_only=stream_only,
            workdir=demo.workdir,
        )
        if quick:
            # Small enough for the test suite, large enough that every source's drift window fills.
            opts.images, opts.fit_images, opts.epochs, opts.blocks, opts.rate_img_s = 150, 1000, 12, 2, 0.0
        if images is not None:
            opts.images = images
        return opts


@dataclass(frozen=True)
class DemoData:
    """Where the demo's images come from."""

    id_train: Path
    id_test: Path
    ood: tuple[Path, ...]


def _shared_data_candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[1]
    return [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]


def resolve_data(id_data: Path | None, ood_data: Path | None) -> DemoData:
    """Find the ID and OOD images: the paths given, else ../shared/data; StartupError says what to pass."""
    root = next((p for p in _shared_data_candidates() if (p / "cifar10").is_dir()), None)
    if id_data is None and root is not None:
        id_data = root / "cifar10"
    if ood_data is None and root is not None:
        ood_data = root
    if id_data is None or ood_data is None:
        raise StartupError(f"no demo data found: {DATA_HINT}")
    for label, path in (("--id-data", id_data), ("--ood-data", ood_data)):
        if not path.exists():
            raise StartupError(f"{label} {path} does not exist: {DATA_HINT}")

    if id_data.is_dir() and (id_data / "train.zip").is_file() and (id_data / "test.zip").is_file():
        id_train, id_test = id_data / "train.zip", id_data / "test.zip"
    elif id_data.is_dir() and (id_data / "cifar10" / "train.zip").is_file():
        id_train, id_test = id_data / "cifar10" / "train.zip", id_data / "cifar10" / "test.zip"
    else:  # one zip or folder: fit on one part, stream another (split by the reader's seeded subsets)
        id_train = id_test = id_data

    ood = tuple(ood_data / name / "test.zip" for name in OOD_SETS if (ood_data / name / "test.zip").is_file())
    if not ood:
        if ood_data.is_dir() and (ood_data / "cifar10").is_dir():
            raise StartupError(f"--ood-data {ood_data} has no tiny_imagenet/test.zip or mnist/test.zip: {DATA_HINT}")
        ood = (ood_data,)
    return DemoData(id_train, id_test, ood)


# ----------------------------------------------------------------------------------------------------------
# the stream


@dataclass(frozen=True)
class StreamItem:
    """One message the demo producer sends."""

    source: str
    image_id: str
    data: bytes
    kind: str  # "id", "ood:<set>" or "corrupt:<name>"


def _png(arr: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def build_stream(data: DemoData, per_source: int, *, seed: int = 0) -> list[StreamItem]:
    """The messages of the three sources, interleaved round-robin (what the producer sends, in order).

    cam-id streams CIFAR-10 test throughout. cam-ood and cam-corrupt stream CIFAR-10 test for the first
    CLEAN_SHARE of their messages, then Tiny-ImageNet/MNIST and corrupted CIFAR-10 (severity 5).
    """
    import numpy as np
    from PIL import Image

    from dlsr.corruptions import corrupt
    from dlsr.readers import open_images

    clean = max(1, int(per_source * CLEAN_SHARE))
    need_id = per_source + 2 * clean + (per_source - clean)  # cam-id + clean parts + images to corrupt
    id_items = list(open_images(data.id_test, limit=need_id, seed=seed + 1))
    if len(id_items) < need_id:
        raise StartupError(f"{data.id_test} has {len(id_items)} images; the demo needs {need_id}: {DATA_HINT}")
    # The subset comes in sorted (class folder) order: shuffled, every source gets every class. Unshuffled,
    # cam-id took the first classes only (airplane .. deer), whose ID flag rate is not the average alpha.
    id_items = [id_items[i] for i in np.random.default_rng(seed + 1).permutation(len(id_items))]
    n_ood = per_source - clean
    ood_items = []
    per_set = -(-n_ood // len(data.ood))
    for path in data.ood:
        ood_items += [(path.parent.name or path.stem, it) for it in open_images(path, limit=per_set, seed=seed)]
    ood_items = [ood_items[i] for i in np.random.default_rng(seed).permutation(len(ood_items))][:n_ood]

    ids = iter(id_items)
    streams: dict[str, list[StreamItem]] = {s: [] for s in SOURCES}
    for i in range(per_source):
        it = next(ids)
        streams[ID_SOURCE].append(StreamItem(ID_SOURCE, f"{ID_SOURCE}/{i}/{it.name}", it.data, "id"))
    for src in (OOD_SOURCE, CORRUPT_SOURCE):
        for i in range(clean):
            it = next(ids)
            streams[src].append(StreamItem(src, f"{src}/{i}/{it.name}", it.data, "id"))
    for j, (set_name, it) in enumerate(ood_items):
        streams[OOD_SOURCE].append(
            StreamItem(OOD_SOURCE, f"{OOD_SOURCE}/{clean + j}/{it.name}", it.data, f"ood:{set_name}")
        )
    rng = np.random.default_rng(seed)
    for j in range(per_source - clean):
        it = next(ids)
        names = CORRUPTIONS[j % len(CORRUPTIONS)]
        name = "+".join(names)
        bad = np.asarray(Image.open(io.BytesIO(it.data)).convert("RGB"), dtype=np.uint8)
        for one in names:
            bad = corrupt(bad, one, CORRUPT_SEVERITY, rng=rng)
        streams[CORRUPT_SOURCE].append(
            StreamItem(CORRUPT_SOURCE, f"{CORRUPT_SOURCE}/{clean + j}/{name}", _png(bad), f"corrupt:{name}")
        )
    return [streams[s][i] for i in range(per_source) for s in SOURCES]


@dataclass
class Tally:
    """What came back from the product: score records and alerts, per source (thread-safe)."""

    scored: Counter = field(default_factory=Counter)
    ood: Counter = field(default_factory=Counter)
    drift_raised: Counter = field(default_factory=Counter)
    drift_cleared: Counter = field(default_factory=Counter)
    ood_alerts: Counter = field(default_factory=Counter)
    model_alerts: int = 0
    versions: set = field(default_factory=set)
    first_score: float | None = None
    last_score: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def total(self) -> int:
        with self.lock:
            return sum(self.scored.values())

    def add_score(self, rec: dict) -> None:
        now = time.time()
        with self.lock:
            self.scored[rec["source"]] += 1
            self.ood[rec["source"]] += int(bool(rec.get("is_ood")))
            self.versions.add(rec.get("model_version"))
            self.first_score = self.first_score or now
            self.last_score = now

    def add_alert(self, alert: dict) -> None:
        with self.lock:
            kind = alert.get("kind")
            if kind == "drift":
                target = self.drift_raised if alert.get("state") == "raised" else self.drift_cleared
                target[alert.get("source")] += 1
            elif kind == "ood":
                self.ood_alerts[alert.get("source")] += 1
            elif kind == "model":
                self.model_alerts += 1


def _follow_outputs(kafka: KafkaSettings, tally: Tally, stop: threading.Event, ready: threading.Event) -> None:
    """Read the scores and alerts topics from the beginning into `tally` until `stop`."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        kafka.scores_topic,
        kafka.alerts_topic,
        group_id=f"dlsr-demo-tally-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kafka.client_kwargs(),
    )
    try:
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=300)
            if consumer.assignment():
                ready.set()
            for tp, recs in batch.items():
                for rec in recs:
                    try:
                        data = json.loads(rec.value)
                    except ValueError:
                        continue
                    if tp.topic == kafka.scores_topic:
                        tally.add_score(data)
                    else:
                        tally.add_alert(data)
    finally:
        consumer.close()


def produce(
    kafka: KafkaSettings,
    items: list[StreamItem],
    tally: Tally | None,
    stop: threading.Event,
    max_inflight: int,
    rate_img_s: float = 0.0,
) -> int:
    """Send `items` to the input topic (headers source, image_id, ts) at `rate_img_s` (0 = no pacing); with a
    tally, keep at most `max_inflight` messages unscored so the dashboard shows the present, not a backlog."""
    from kafka import KafkaProducer

    producer = KafkaProducer(linger_ms=5, acks="all", **kafka.client_kwargs())
    sent = 0
    t0 = time.monotonic()
    try:
        for item in items:
            if rate_img_s > 0:
                ahead = t0 + sent / rate_img_s - time.monotonic()
                if ahead > 0:
                    producer.flush()
                    stop.wait(ahead)
            while tally is not None and sent - tally.total() >= max_inflight and not stop.is_set():
                time.sleep(0.05)
            if stop.is_set():
                break
            producer.send(
                kafka.input_topic,
                value=item.data,
                key=item.source.encode(),
                headers=[
                    ("source", item.source.encode()),
                    ("image_id", item.image_id.encode()),
                    ("ts", f"{time.time():.3f}".encode()),
                ],
            )
            sent += 1
            if sent % 32 == 0:
                producer.flush()
        producer.flush()
    finally:
        producer.close()
    return sent


# ----------------------------------------------------------------------------------------------------------
# the model


def fit_quick_model(settings: Settings, opts: DemoOptions, data: DemoData, registry: Registry, console: Console) -> dict:
    """Fit and calibrate a small DLSR model on a CIFAR-10 subset, publish it; returns what it did."""
    import numpy as np

    from dlsr.cache import FeatureCache
    from dlsr.detector import DLSRConfig, DLSRDetector
    from dlsr.encoder import Encoder
    from dlsr.readers import open_images

    t0 = time.perf_counter()
    m = settings.model
    device = m.device
    encoder = Encoder.create(
        m.encoder, m.encoder_weights, m.stages, input_size=opts.input_size, device=device, precision=m.precision,
        runtime=m.runtime, threads=m.runtime_threads, streams=m.runtime_streams, export_dir=m.export_cache,
    )
    images = open_images(data.id_train, limit=opts.fit_images, seed=0)
    console.print(f"[bold]fit[/] encoding {len(images)} CIFAR-10 images at {opts.input_size}px (cached after the first run)")
    feats = FeatureCache(m.feature_cache).features(encoder, images, batch_size=m.batch_size, progress=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(feats))
    n_cal = max(200, len(feats) // 4)
    fit_x, cal_x = feats[order[n_cal:]], feats[order[:n_cal]]
    console.print(f"[bold]fit[/] training the LFDN on {len(fit_x)} features, calibrating on {n_cal} "
                  f"(alpha {opts.alpha}, {m.calibration}" + (f" delta {m.delta})" if m.calibration == "pac" else ")"))
    config = DLSRConfig(score=m.score, n_blocks=opts.blocks, width=opts.width, epochs=opts.epochs, batch_size=128)
    detector = DLSRDetector(encoder, config=config, device=device, boundaries=encoder.boundaries)
    estimate = detector.estimate_fit(len(fit_x), fit_x.shape[1])
    console.print(f"[bold]fit[/] {estimate.line(detector.config, str(detector.device))}")
    detector.fit(fit_x, progress=True)
    detector.calibrate(cal_x, alpha=opts.alpha, method=m.calibration, delta=m.delta)
    with tempfile.TemporaryDirectory(prefix="dlsr-demo-model-") as tmp:
        path = detector.save(Path(tmp) / "model")
        entry = registry.publish(
            path,
            threshold=float(detector.threshold),
            alpha=float(opts.alpha),
            data_sizes={"fit": int(len(fit_x)), "calibration": int(n_cal)},
            extra={"made_by": "dlsr demo"},
            calibration=m.calibration,
            delta=m.delta if m.calibration == "pac" else None,
        )
    return {"version": entry.version, "threshold": entry.threshold, "fit_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class SourceResult:
    """One line of the summary."""

    source: str
    images: int
    ood: int
    ood_rate: float
    drift_alerts: int
    flagged: bool


@dataclass
class DemoSummary:
    """What the demo prints at the end (and writes with --json)."""

    images_sent: int
    images_scored: int
    sources: list[SourceResult]
    drift_alerts: int
    ood_alerts: int
    throughput_img_s: float
    model_version: str | None
    threshold: float | None
    alpha: float
    fit_s: float
    stream_s: float
    total_s: float
    started: dict[str, str]
    run_id: str = ""
    rate_img_s: float = 0.0  # the producer's pacing (0 = as fast as scored)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _demo_settings(
    settings: Settings, bootstrap: str, redis_url: str, run_id: str, workdir: Path, alpha: float
) -> Any:
    """The settings the demo's monitor runs with: its own topics, key prefix and fast windows."""
    tag = f"demo-{run_id}"
    kafka = settings.kafka.model_copy(
        update={
            "bootstrap_servers": bootstrap,
            "input_topic": f"{tag}-images",
            "scores_topic": f"{tag}-scores",
            "alerts_topic": f"{tag}-alerts",
            "dlq_topic": f"{tag}-dlq",
            "vetted_topic": f"{tag}-vetted",
            "group_id": f"{tag}-monitor",
            "topic_partitions": 1,
        }
    )
    if redis_url != settings.redis.url:  # an embedded server: none of the configured auth applies
        redis = settings.redis.model_copy(update={"url": redis_url, "prefix": tag, "password": None, "username": None})
    else:
        redis = settings.redis.model_copy(update={"prefix": tag})
    monitor = settings.monitor.model_copy(
        update={
            "instance_id": f"{tag}-monitor",
            "bucket_s": 5,
            "window_buckets": 6,
            "drift_min_images": 30,
            "heartbeat_s": 1.0,
            "batch_max": 32,
            "batch_wait_ms": 100,
        }
    )
    from dlsr.devices import resolve_device

    model = settings.model.model_copy(
        update={
            "artifact_store": workdir / "artifacts",
            "feature_cache": workdir / "features",
            "device": str(resolve_device(settings.model.device)),  # 'auto' resolved once, for every part
            "alpha": alpha,
        }
    )
    return settings.model_copy(update={"kafka": kafka, "redis": redis, "monitor": monitor, "model": model})


def _start_servers(settings: Settings, stack: contextlib.ExitStack, console: Console) -> tuple[str, str, dict[str, str]]:
    from dlsr_monitor.demo.embedded import TansuBroker, broker_ready, ensure_redis

    started: dict[str, str] = {}
    bootstrap = settings.kafka.bootstrap_servers
    if broker_ready(bootstrap, timeout_s=2.0):
        console.print(f"[bold]kafka[/] using the broker at {bootstrap}")
    else:
        broker = TansuBroker().start()
        stack.callback(broker.stop)
        bootstrap = broker.bootstrap
        started["kafka"] = f"Tansu (in memory) at {bootstrap}"
        console.print(f"[bold]kafka[/] none at {settings.kafka.bootstrap_servers}: started {started['kafka']}")
    redis_url, embedded = ensure_redis(settings.redis.url)
    if embedded is not None:
        stack.callback(embedded.stop)
        started["redis"] = f"embedded Redis at {redis_url}"
        console.print(f"[bold]redis[/] none at {settings.redis.url}: started {started['redis']}")
    else:
        console.print(f"[bold]redis[/] using {redis_url}")
    return bootstrap, redis_url, started


def _flagged(images: int, ood: int, drift: int, alpha: float) -> bool:
    # A source is flagged when its drift test raised; the OOD rate is shown beside it for the reader.
    return drift > 0


def summarise(
    tally: Tally,
    *,
    sent: int,
    alpha: float,
    model: dict,
    times: dict,
    started: dict,
    run_id: str = "",
    rate_img_s: float = 0.0,
) -> DemoSummary:
    with tally.lock:
        rows = []
        for src in SOURCES:
            n, o, d = tally.scored[src], tally.ood[src], tally.drift_raised[src]
            rows.append(SourceResult(src, n, o, (o / n) if n else 0.0, d, _flagged(n, o, d, alpha)))
        span = (tally.last_score or 0) - times["stream_start"]
        scored = sum(tally.scored.values())
        return DemoSummary(
            images_sent=sent,
            images_scored=scored,
            sources=rows,
            drift_alerts=sum(tally.drift_raised.values()),
            ood_alerts=sum(tally.ood_alerts.values()),
            throughput_img_s=scored / span if span > 0 else 0.0,
            model_version=model.get("version"),
            threshold=model.get("threshold"),
            alpha=alpha,
            fit_s=times.get("fit_s", 0.0),
            stream_s=times.get("stream_s", 0.0),
            total_s=times.get("total_s", 0.0),
            started=started,
            run_id=run_id,
            rate_img_s=rate_img_s,
        )


def print_summary(summary: DemoSummary, console: Console) -> None:
    table = Table(title="DLSR demo summary", title_justify="left")
    for col, just in (("source", "left"), ("images", "right"), ("OOD flagged", "right"), ("OOD rate", "right"),
                      ("drift alerts", "right"), ("verdict", "left")):
        table.add_column(col, justify=just)
    for s in summary.sources:
        verdict = "[bold red]FLAGGED[/]" if s.flagged else "[green]ok[/]"
        table.add_row(s.source, str(s.images), str(s.ood), f"{100 * s.ood_rate:.1f}%", str(s.drift_alerts), verdict)
    console.print(table)
    console.print(
        f"images scored {summary.images_scored}/{summary.images_sent}, drift alerts raised {summary.drift_alerts}, "
        f"OOD alerts {summary.ood_alerts}, throughput {summary.throughput_img_s:.1f} images/s"
        + (f" (sent at {summary.rate_img_s:g}/s)" if summary.rate_img_s else " (unpaced)")
        + " "
        f"(model {summary.model_version}, threshold {summary.threshold:.4g}, alpha {summary.alpha:g})"
    )
    console.print(
        f"time: fit {summary.fit_s:.0f} s, stream {summary.stream_s:.0f} s, total {summary.total_s:.0f} s"
    )


def _wait(predicate, timeout_s: float, stop: threading.Event | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if stop is not None and stop.is_set():
            return False
        time.sleep(0.2)
    return predicate()


@contextlib.contextmanager
def _quiet_logs(path: Path) -> Iterator[None]:
    """Send the monitor's log lines to a file while the dashboard owns the terminal."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = list(root.handlers), root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, _ = saved[0], handler.close()
        root.setLevel(saved[1])


def run_demo(settings: Settings, opts: DemoOptions, *, console: Console | None = None) -> int:
    """`dlsr demo`: returns 0 when the summary shows what it should (ID ok, OOD and corrupted flagged)."""
    console = console or Console()
    t_start = time.perf_counter()
    data = resolve_data(opts.id_data, opts.ood_data)
    if opts.stream_only:
        return _stream_only(settings, opts, data, console)
    if threading.current_thread() is not threading.main_thread():
        return _run(settings, opts, data, console, t_start)
    # SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so what the demo started is stopped either way.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(settings, opts, data, console, t_start)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(settings: Settings, opts: DemoOptions, data: DemoData, console: Console, t_start: float) -> int:
    import redis as redis_lib

    from dlsr_monitor.common.kafka_io import ensure_topics
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.common.registry import Registry
    from dlsr_monitor.console.dashboard import live_loop, mask_url, read_snapshot, render
    from dlsr_monitor.console.views import StateView
    from dlsr_monitor.monitor.service import run_monitor

    run_id = uuid.uuid4().hex[:8]
    opts.workdir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        bootstrap, redis_url, started = _start_servers(settings, stack, console)
        cfg = _demo_settings(settings, bootstrap, redis_url, run_id, opts.workdir, opts.alpha)
        client = redis_lib.Redis.from_url(cfg.redis.url, **cfg.redis.client_kwargs())
        keys = Keys.of(cfg.redis)
        stack.callback(client.close)
        stack.callback(_delete_keys, client, keys)  # the run's own prefix: nothing else is touched

        console.print(f"[bold]data[/] ID {data.id_train.parent if data.id_train.is_file() else data.id_train}, "
                      f"OOD {', '.join(str(p) for p in data.ood)}")
        stream = build_stream(data, opts.images)

        registry = Registry(client, keys, cfg.model.artifact_store)
        model = fit_quick_model(cfg, opts, data, registry, console)
        times["fit_s"] = model["fit_s"]
        console.print(f"[bold]model[/] {model['version']} live, threshold {model['threshold']:.4g}")

        k = cfg.kafka
        ensure_topics(k, [k.input_topic, k.scores_topic, k.alerts_topic, k.dlq_topic], partitions=1)
        stop = threading.Event()
        tally = Tally()
        ready = threading.Event()
        follower = threading.Thread(target=_follow_outputs, args=(k, tally, stop, ready), daemon=True)
        follower.start()
        stack.callback(follower.join, 10)
        stack.callback(stop.set)  # callbacks run last-in first-out: stop, then join

        # The monitor: the same wiring as `dlsr monitor`, in a thread of this process.
        monitor_stop = threading.Event()
        monitor_error: list[BaseException] = []

        def monitor_main() -> None:
            try:
                run_monitor(cfg, monitor_stop, handle_signals=False)
            except BaseException as exc:  # reported below; the demo must not hang on a dead monitor
                monitor_error.append(exc)

        stack.enter_context(_quiet_logs(opts.workdir / f"monitor-{run_id}.log"))
        monitor = threading.Thread(target=monitor_main, name="dlsr-demo-monitor", daemon=True)
        monitor.start()
        stack.callback(monitor.join, 30)
        stack.callback(monitor_stop.set)
        if not _wait(ready.is_set, 30):
            raise StartupError(f"could not read the demo's output topics from {bootstrap}")
        state = StateView.from_settings(client, keys, cfg.monitor)
        log_path = opts.workdir / f"monitor-{run_id}.log"
        if not _wait(lambda: bool(monitor_error or state.read_heartbeats()), 120):
            raise StartupError(f"the demo's monitor did not start serving in 120 s: {_last_warning(log_path)}")
        if monitor_error:
            raise StartupError(f"the demo's monitor stopped: {monitor_error[0]}")

        sent_box = [0]
        produced = threading.Event()

        def producer_main() -> None:
            try:
                sent_box[0] = produce(k, stream, tally, stop, opts.max_inflight, opts.rate_img_s)
            finally:
                produced.set()

        times["stream_start"] = time.time()
        console.print(f"[bold]stream[/] {len(stream)} images from {', '.join(SOURCES)} (run {run_id})")
        if not (opts.dashboard and console.is_terminal):
            console.print(
                f"[dim]watch it: DLSR_REDIS__URL={mask_url(cfg.redis.url)} DLSR_REDIS__PREFIX={cfg.redis.prefix} "
                "dlsr dashboard[/]"
            )
        producer = threading.Thread(target=producer_main, name="dlsr-demo-producer", daemon=True)
        producer.start()

        def finished() -> bool:
            return bool(monitor_error) or (produced.is_set() and tally.total() >= sent_box[0])

        def snapshot():
            return read_snapshot(state, history_s=900, alerts_shown=6, redis_url=cfg.redis.url)

        done = threading.Event()
        watcher = threading.Thread(
            target=lambda: (_wait(finished, 600, stop), time.sleep(2.0), done.set()), daemon=True
        )
        watcher.start()
        if opts.dashboard and console.is_terminal:
            live_loop(snapshot, refresh_s=0.5, console=console, stop=done)
            if not done.is_set():  # q or Ctrl-C: stop streaming, still summarise what was scored
                stop.set()
        else:
            last = 0.0
            while not done.wait(1.0):
                if time.monotonic() - last > 10:
                    console.print(f"[dim]scored {tally.total()}/{len(stream)}[/]")
                    last = time.monotonic()
        producer.join(10)
        _wait(lambda: tally.total() >= sent_box[0], 30)
        times["stream_s"] = time.time() - times["stream_start"]
        time.sleep(1.0)  # let the last drift evaluation and alerts land
        if monitor_error:
            raise StartupError(f"the demo's monitor stopped: {monitor_error[0]}")
        if opts.dashboard:
            console.print(render(snapshot(), console.size.width))
        times["total_s"] = time.perf_counter() - t_start
        summary = summarise(
            tally, sent=sent_box[0], alpha=opts.alpha, model=model, times=times, started=started, run_id=run_id,
            rate_img_s=opts.rate_img_s,
        )
    print_summary(summary, console)
    if opts.json_path:
        opts.json_path.write_text(summary.to_json())
    by = {s.source: s for s in summary.sources}
    ok = not by[ID_SOURCE].flagged and by[OOD_SOURCE].flagged and by[CORRUPT_SOURCE].flagged
    if not ok:
        console.print("[bold red]the summary is not what the demo expects (ID ok, OOD and corrupted flagged)[/]")
    return 0 if ok else 1


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _last_warning(log_path: Path) -> str:
    """The monitor's last warning or error line (why it did not start), for a one-line message."""
    try:
        lines = [ln for ln in log_path.read_text().splitlines() if " WARNING " in ln or " ERROR " in ln]
    except OSError:
        return f"see {log_path}"
    return (lines[-1].split(": ", 1)[-1] if lines else "no warning logged") + f" (log: {log_path})"


def _delete_keys(client: Any, keys: Any) -> None:
    with contextlib.suppress(Exception):
        for name in client.scan_iter(keys.all_pattern(), count=1000):
            client.delete(name)


def _stream_only(settings: Settings, opts: DemoOptions, data: DemoData, console: Console) -> int:
    """`dlsr demo --stream-only`: the compose demo producer; sends the three sources to the configured topic."""
    from dlsr_monitor.common.connections import with_retries
    from dlsr_monitor.common.kafka_io import ensure_topics

    k = settings.kafka
    with_retries(
        lambda: ensure_topics(k, [k.input_topic], partitions=k.topic_partitions),
        what="Kafka", where=k.bootstrap_servers, retries=k.connect_retries, backoff_s=k.retry_backoff_s,
        fix="start the broker or set DLSR_KAFKA__BOOTSTRAP_SERVERS",
    )
    stream = build_stream(data, opts.images)
    sent = produce(k, stream, None, threading.Event(), opts.max_inflight, opts.rate_img_s)
    console.print(f"sent {sent} images to {k.input_topic} at {k.bootstrap_servers} from {', '.join(SOURCES)}")
    return 0
