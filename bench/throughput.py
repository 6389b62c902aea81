"""`dlsr bench throughput`: the monitor service end to end, next to the bare scorer, on this machine.

What it does:
1. Starts an embedded Tansu broker (unless --bootstrap) and uses the configured Redis (or an embedded one), all
   under a throw-away key prefix and fresh topics.
2. Builds a detector of the configured shape (LFDN blocks, t) on real CIFAR-10 features (speed does not depend on
   the trained values; --model PATH benchmarks a real artifact instead) and publishes it in that prefix.
3. Bare scorer: `encoder.preprocess`d batches through `detector.score_pixels` in this process, at the same batch
   size and input size as the service (median of repeats, measured before and after the service run).
4. Service: `python -m monitor` as its own process. A producer process offers load into the input topic:
   saturated phase for --duration s in which the producer keeps 4 batches waiting in the topic (the monitor never
   idles) -> pipeline images/s from the score records' broker timestamps, the monitor's own time inside
   `score_pixels` (from its heartbeat: scorer images/s inside the service and the fraction of wall time spent
   scoring), and the monitor's RSS sampled every 2 s; then, after the backlog drains, a latency phase at
   50% of the measured pipeline rate -> p50/p99 end-to-end latency (input timestamp -> score record timestamp).
5. Prints one JSON object: scorer_img_s, pipeline_img_s, ratio (pipeline / the faster of the bare scorer and the
   scorer as timed inside the monitor), ratio_vs_bare_scorer, latency_p50_ms, latency_p99_ms, device,
   batch_size, input_size, rss_mb (start/end/max/growth_pct), and the counts behind each number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of saturated load (RSS is tracked over it)")
    p.add_argument("--latency-duration", type=float, default=30.0, help="Seconds of load at 50%% of saturation")
    p.add_argument("--batch-size", type=int, default=None, help="Scoring batch (default: monitor.batch_max)")
    p.add_argument("--input-size", type=int, default=None, help="Encoder input size (default: model.input_size)")
    p.add_argument("--device", default=None, help="cpu / cuda / auto (default: model.device)")
    p.add_argument("--model", type=Path, default=None, help="A saved detector directory to benchmark")
    p.add_argument("--n-blocks", type=int, default=16, help="LFDN blocks of the built detector (default 16)")
    p.add_argument("--bootstrap", default=None, help="Use this Kafka instead of an embedded Tansu broker")
    p.add_argument("--data", type=Path, default=None, help="Shared data folder (default ../shared/data)")
    p.add_argument("--pool", type=int, default=500, help="Distinct CIFAR-10 test images cycled as input")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="Also write the JSON here")


# ---- producer process ------------------------------------------------------------------------------------
def _produce(bootstrap: str, topic: str, payloads: list[bytes], rate: float, duration: float, tag: str,
             done: Any, scored: Any = None, backlog: int = 0) -> None:
    """Offer `rate` messages/s for `duration` s (ids `<tag>-<n>`); puts the count sent on `done`.

    With `scored` (a shared counter of score records seen) it saturates instead: it keeps `backlog` messages
    waiting in the topic at all times, whatever the monitor's speed.
    """
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=256 * 1024)
    t0 = time.monotonic()
    n = 0
    while True:
        now = time.monotonic() - t0
        if now >= duration:
            break
        due = int(now * rate) + 1 if scored is None else scored.value + backlog
        while n < due:
            p.send(topic, value=payloads[n % len(payloads)], key=b"bench",
                   headers=[("image_id", f"{tag}-{n}".encode()), ("source", b"bench")])
            n += 1
        time.sleep(0.005)
    p.flush(60)
    p.close()
    done.put(n)


def _offer(bootstrap: str, topic: str, payloads: list[bytes], rate: float, duration: float, tag: str,
           scored: Any = None, backlog: int = 0):
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(
        target=_produce, args=(bootstrap, topic, payloads, rate, duration, tag, done, scored, backlog), daemon=True
    )
    proc.start()
    return proc, done


# ---- reading score records ---------------------------------------------------------------------------------
class _ScoreTap:
    """Follows the scores topic in a thread: image_id -> (broker timestamp ms, latency_ms, ts)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer

        self.seen: dict[str, tuple[int, float, float]] = {}
        self._c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for recs in self._c.poll(timeout_ms=200, max_records=5000).values():
                with self._lock:
                    for r in recs:
                        d = json.loads(r.value)
                        self.seen.setdefault(d["image_id"], (r.timestamp, d["latency_ms"], d["ts"]))

    def count(self, tag: str) -> int:
        with self._lock:
            return sum(1 for k in self.seen if k.startswith(tag + "-"))

    def of(self, tag: str) -> list[tuple[int, float, float]]:
        with self._lock:
            return [v for k, v in self.seen.items() if k.startswith(tag + "-")]

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._c.close()


def _beat(r: Any, keys: Any) -> dict[str, float]:
    """The bench monitor's heartbeat counters (scored images, seconds inside score_pixels, time)."""
    for name in r.zrange(keys.heartbeats(), 0, -1):
        h = {k.decode(): v.decode() for k, v in r.hgetall(keys.heartbeat(name.decode())).items()}
        if h:
            return {"scored": float(h.get("scored", 0)), "score_s": float(h.get("score_s", 0)),
                    "batches": float(h.get("batches", 0)), "ts": float(h.get("ts", 0))}
    return {"scored": 0.0, "score_s": 0.0, "batches": 0.0, "ts": time.time()}


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _wait_count(tap: _ScoreTap, tag: str, n: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while tap.count(tag) < n:
        if proc.poll() is not None:
            raise RuntimeError(f"the monitor exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {tap.count(tag)}/{n} '{tag}' score records after {timeout:.0f} s")
        time.sleep(0.2)


# ---- the bare scorer ------------------------------------------------------------------------------------
def _bare_scorer(det: Any, images: list, batch_size: int, repeats: int = 3, min_s: float = 8.0,
                 warm_s: float = 10.0) -> float:
    """Images/s of detector.score_pixels on preprocessed batches (median over repeats of >= min_s each)."""
    import torch

    x = det.encoder.preprocess(images[:batch_size])
    rates = []
    with torch.inference_mode():
        # Warm-up: the first ~10 s of a process score at half speed (oneDNN kernels, heap growth); the
        # monitor is long past that when it is measured, so the bare scorer must be too.
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warm_s:
            det.score_pixels(x)
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_s:
                det.score_pixels(x)
                n += len(x)
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _build_model(args: argparse.Namespace, settings: Settings, input_size: int, device: str, out: Path) -> Path:
    """A detector of the configured shape, fitted briefly on real CIFAR-10 features (speed does not depend on
    the trained values) and calibrated, saved to `out`."""
    from dlsr.cache import FeatureCache
    from dlsr.detector import DLSRDetector
    from dlsr.encoder import Encoder
    from dlsr.readers import open_images

    enc = Encoder.create(settings.model.encoder, weights=settings.model.encoder_weights,
                         stages=settings.model.stages, input_size=input_size, device=device,
                         precision=settings.model.precision, runtime=settings.model.runtime,
                         threads=settings.model.runtime_threads, streams=settings.model.runtime_streams,
                         export_dir=settings.model.export_cache)
    feats = FeatureCache(settings.model.feature_cache).features(
        enc, open_images(_data(args) / "cifar10" / "train.zip", limit=600, seed=0), progress=True
    )
    det = DLSRDetector(enc, n_blocks=args.n_blocks, epochs=1, device=device, progress=False)
    det.fit(feats[:300])
    det.calibrate(feats[300:], alpha=settings.model.alpha)
    return det.save(out)


def _data(args: argparse.Namespace) -> Path:
    if args.data:
        return args.data
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dlsr_monitor.monitor.service import limit_heap_growth

    # The same allocator setting as the monitor process, so the bare scorer is timed under equal conditions
    # (on this machine glibc's default per-thread arenas make torch's CPU scoring markedly slower).
    limit_heap_growth()
    import redis

    from dlsr.artifacts import load_detector
    from dlsr.devices import resolve_device
    from dlsr.images import decode_image
    from dlsr.readers import open_images
    from dlsr_monitor.common.kafka_io import ensure_topics
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.common.registry import Registry
    from dlsr_monitor.demo.embedded import TansuBroker, ensure_redis

    batch_size = args.batch_size or settings.monitor.batch_max
    # auto (the trainer's choice from its fit images) stays at 224 here, comparable with the earlier figures.
    configured = settings.model.input_size if isinstance(settings.model.input_size, int) else None
    input_size = args.input_size or configured or 224
    device = str(resolve_device(args.device or settings.model.device))
    work = Path(tempfile.mkdtemp(prefix="dlsr-bench-"))
    broker = None if args.bootstrap else TansuBroker().start()
    bootstrap = args.bootstrap or broker.bootstrap
    redis_url, embedded_redis = ensure_redis(settings.redis.url)
    prefix = f"dlsr-bench-{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:8]
    topics = {"input": f"bench-in-{tag}", "scores": f"bench-scores-{tag}", "alerts": f"bench-alerts-{tag}",
              "dlq": f"bench-dlq-{tag}"}
    monitor_proc: subprocess.Popen | None = None
    tap: _ScoreTap | None = None
    try:
        model_dir = args.model or _build_model(args, settings, input_size, device, work / "model")
        det = load_detector(model_dir, device=device, runtime=settings.model.runtime, runtime_options={
            "threads": settings.model.runtime_threads, "streams": settings.model.runtime_streams,
            "export_dir": settings.model.export_cache})
        input_size = det.encoder.input_size
        payloads = [it.data for it in open_images(_data(args) / "cifar10" / "test.zip", limit=args.pool, seed=0)]
        images = [decode_image(p) for p in payloads[: max(batch_size, 1)]]
        print(f"bare scorer: batch {batch_size}, {input_size} px, {device} ...", file=sys.stderr)
        scorer_before = _bare_scorer(det, images, batch_size)
        Registry(r, keys, work / "store").publish(model_dir, threshold=float(det.threshold), alpha=float(det.alpha))
        ensure_topics(bootstrap, list(topics.values()), partitions=1)

        env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
        env.update({
            "DLSR_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "DLSR_KAFKA__INPUT_TOPIC": topics["input"],
            "DLSR_KAFKA__SCORES_TOPIC": topics["scores"], "DLSR_KAFKA__ALERTS_TOPIC": topics["alerts"],
            "DLSR_KAFKA__DLQ_TOPIC": topics["dlq"], "DLSR_KAFKA__GROUP_ID": f"bench-{tag}",
            "DLSR_REDIS__URL": redis_url, "DLSR_REDIS__PREFIX": prefix,
            "DLSR_MODEL__ARTIFACT_STORE": str(work / "store"), "DLSR_MODEL__DEVICE": device,
            "DLSR_MONITOR__BATCH_MAX": str(batch_size), "DLSR_MONITOR__INSTANCE_ID": f"bench-{tag}",
            "DLSR_MONITOR__BATCH_WAIT_MS": str(settings.monitor.batch_wait_ms),
            "DLSR_MONITOR__DECODE_THREADS": str(settings.monitor.decode_threads),
            "DLSR_MONITOR__HEARTBEAT_S": "1",
            "DLSR_MODEL__RUNTIME": settings.model.runtime,
            "DLSR_MODEL__RUNTIME_STREAMS": str(settings.model.runtime_streams),
            "DLSR_MODEL__EXPORT_CACHE": str(Path(settings.model.export_cache).resolve()),
            **({"DLSR_MODEL__RUNTIME_THREADS": str(settings.model.runtime_threads)}
               if settings.model.runtime_threads else {}),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        })
        log_path = work / "monitor.log"
        with open(log_path, "wb") as log:
            monitor_proc = subprocess.Popen([sys.executable, "-m", "dlsr_monitor.monitor", "--log-level", "WARNING"],
                                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        tap = _ScoreTap(bootstrap, topics["scores"])

        # Warm-up: the group join, model load and first batches are not part of any figure.
        warm = 4 * batch_size
        proc, done = _offer(bootstrap, topics["input"], payloads, warm / 2.0, 2.0, "warm")
        proc.join(120)
        _wait_count(tap, "warm", done.get(timeout=10), 300, monitor_proc)

        # Saturated phase: the producer keeps 4 batches waiting in the topic for --duration s, so the monitor
        # never idles; its RSS is sampled every 2 s and its own scoring time read from its heartbeat.
        print(f"saturated phase: {args.duration:.0f} s with a standing backlog ...", file=sys.stderr)
        scored = mp.get_context("spawn").Value("q", tap.count("sat"))
        proc, done = _offer(bootstrap, topics["input"], payloads, 0.0, args.duration, "sat", scored, 4 * batch_size)
        rss: list[tuple[float, float]] = []
        t0 = time.monotonic()
        beat0: dict | None = None
        next_rss = t0
        while proc.is_alive():
            if monitor_proc.poll() is not None:
                raise RuntimeError(f"the monitor exited with {monitor_proc.returncode} (log: {log_path})")
            scored.value = tap.count("sat")
            if beat0 is None and scored.value >= 2 * batch_size:
                beat0 = _beat(r, keys)  # after the first batches (they raced the producer's start)
                stamp0 = time.time() * 1000.0
            if time.monotonic() >= next_rss:
                value = _rss_mb(monitor_proc.pid)
                if value is not None:
                    rss.append((time.monotonic() - t0, value))
                next_rss += 2.0
            time.sleep(0.1)
        if beat0 is None:
            raise SystemExit(
                f"dlsr bench throughput: the monitor scored only {scored.value} images in the {args.duration:.0f} s "
                f"saturated phase (fewer than 2 batches of {batch_size}): raise --duration or lower the batch size"
            )
        beat1 = _beat(r, keys)
        stamp1 = time.time() * 1000.0
        sent_sat = done.get(timeout=10)
        _wait_count(tap, "sat", sent_sat, 600, monitor_proc)  # drain the backlog before the next phase
        # Capacity = score records between the two heartbeat reads, by their broker timestamps.
        stamps = sorted(ts for ts, _, _ in tap.of("sat") if stamp0 <= ts <= stamp1)
        pipeline = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000.0) if len(stamps) > 1 else float("nan")
        in_scored = beat1["scored"] - beat0["scored"]
        in_score_s = beat1["score_s"] - beat0["score_s"]
        scorer_in_process = in_scored / in_score_s if in_score_s > 0 else float("nan")
        mean_batch = in_scored / max(1.0, beat1["batches"] - beat0["batches"])
        busy_fraction = in_score_s / ((beat1["ts"] - beat0["ts"]) or float("nan"))
        scorer_after = _bare_scorer(det, images, batch_size)
        scorer = statistics.mean([scorer_before, scorer_after])

        # Latency at 50% of the saturated rate.
        rate = 0.5 * pipeline
        print(f"latency phase: {rate:.1f} img/s for {args.latency_duration:.0f} s ...", file=sys.stderr)
        proc, done = _offer(bootstrap, topics["input"], payloads, rate, args.latency_duration, "lat")
        proc.join(args.latency_duration + 120)
        _wait_count(tap, "lat", done.get(timeout=10), 300, monitor_proc)
        lat = sorted(ts - in_ts * 1000.0 for ts, _, in_ts in tap.of("lat"))

        def pct(values: list[float], q: float) -> float:
            return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")

        quarter = max(1, len(rss) // 4)
        first_q = statistics.mean(v for _, v in rss[:quarter]) if rss else float("nan")
        last_q = statistics.mean(v for _, v in rss[-quarter:]) if rss else float("nan")
        result = {
            "scorer_img_s": round(scorer, 2),
            "pipeline_img_s": round(pipeline, 2),
            # Against the faster of the two scorer timings, so a slow bare-scorer measurement (a busy shared
            # machine) cannot flatter the ratio.
            "ratio": round(pipeline / max(scorer, scorer_in_process), 3),
            "ratio_vs_bare_scorer": round(pipeline / scorer, 3),
            "latency_p50_ms": round(pct(lat, 0.50), 1),
            "latency_p99_ms": round(pct(lat, 0.99), 1),
            "device": _device_name(device),
            "batch_size": batch_size,
            "input_size": input_size,
            "scorer_img_s_before_after": [round(scorer_before, 2), round(scorer_after, 2)],
            "scorer_in_monitor_img_s": round(scorer_in_process, 2),
            "monitor_scoring_fraction": round(busy_fraction, 3),
            "monitor_mean_batch": round(mean_batch, 1),
            "saturated_s": round(rss[-1][0], 1) if rss else None,
            "saturated_records": len(stamps),
            "latency_rate_img_s": round(rate, 2),
            "latency_records": len(lat),
            "rss_mb": {
                "start": round(rss[0][1], 1) if rss else None,
                "end": round(rss[-1][1], 1) if rss else None,
                "max": round(max(v for _, v in rss), 1) if rss else None,
                "first_quarter_mean": round(first_q, 1),
                "last_quarter_mean": round(last_q, 1),
                "growth_pct": round(100.0 * (last_q - first_q) / first_q, 2) if rss else None,
                "samples": len(rss),
            },
            "model": str(args.model) if args.model else f"DLSR n_blocks={args.n_blocks} (bench-built)",
        }
        print(json.dumps(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        if tap is not None:
            tap.close()
        if monitor_proc is not None and monitor_proc.poll() is None:
            monitor_proc.terminate()
            try:
                monitor_proc.wait(60)
            except subprocess.TimeoutExpired:
                monitor_proc.kill()
        for k in r.scan_iter(keys.all_pattern(), count=1000):
            r.delete(k)
        r.close()
        if broker is not None:
            broker.stop()
        if embedded_redis is not None:
            embedded_redis.stop()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    import platform

    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"
