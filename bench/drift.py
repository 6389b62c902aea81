"""`dlsr bench drift`: false drift alarms on correlated video, and how fast a real shift raises drift, old vs new.

The old test counts every frame as evidence (`drift_evidence = frames`); the new one counts one unit per new
scene (`drift_evidence = scenes`, `monitor.scenes`). Both run the product's `DriftTest` at the product defaults
on the service's window (event-time buckets of `bucket_s`, `window_buckets` of them; frames at `--fps`), evaluated
every `--eval-every` frames, on:

- video: clips of 30..300 frames of one CIFAR-10 test image each (`dlsr.video`: smooth jitter, zoom, brightness
  drift, sensor noise); false raises per 100,000 frames over `--seeds` streams of `--frames` frames;
- iid: every frame a random pool frame of a random clip (no correlation; the old test's home ground);
- shifts: the same streams switched at `--shift-at` to clips of OOD images (`--ood-set`) or to corrupted ID clips
  (`--corruption`, severity `--severity`); the delay is frames from the switch to the first raise (the state is
  set to "ok" at the switch, so an earlier false raise does not count as a detection).

Encoding 100k-frame streams is too slow on a CPU, so a pool of real generated clips (`--pool-clips` ID,
`--shift-clips` OOD and corrupted) is encoded once (features cached) and scored by a product-shaped DLSR model
(Lite0 features at the demo's input size and alpha, fitted on `--train-size` CIFAR-10 train images, calibrated on
one video frame each of `--cal-size` other CIFAR-10 test images: the deployment calibrates on what its camera
sends); each stream draws whole clips from its pool at random. The output says so. A pool of a few
dozen scenes has a flag rate of its own (a 300-frame clip of a flagged image is several percent of the pool), so
its rate is printed: above alpha x `drift_null_factor` the streams are not in distribution for the test.
The per-time-block candidate (`--blocks`) is reported in `meta.candidates`, not in `rows`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.bench import common

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.set_defaults(input_size=64)
    p.add_argument("--train-size", type=int, default=2000, help="CIFAR-10 train images fitted on (default 2000)")
    p.add_argument("--cal-size", type=int, default=1000,
                   help="CIFAR-10 test images (not in any clip) whose video frames calibrate (default 1000)")
    p.add_argument("--epochs", type=int, default=8, help="LFDN epochs (default 8)")
    p.add_argument("--alpha", type=float, default=None,
                   help="false-alarm rate per image (default: the demo's, demo.alpha: with few distinct scenes in "
                   "the pool, a smaller alpha leaves the pool's own flag rate to chance)")
    p.add_argument("--pool-clips", type=int, default=60, help="ID clips encoded for the pool (default 60)")
    p.add_argument("--shift-clips", type=int, default=8, help="OOD and corrupted clips each (default 8)")
    p.add_argument("--frames", type=int, default=100_000, help="frames per false-alarm stream (default 100000)")
    p.add_argument("--seeds", type=int, default=3, help="streams per kind (default 3)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second of event time (default 30)")
    p.add_argument("--shift-at", type=int, default=30_000, help="frame at which the shift starts (default 30000)")
    p.add_argument("--after", type=int, default=20_000, help="frames after the shift to wait for a raise")
    p.add_argument("--eval-every", type=int, default=10, help="frames between drift evaluations (default 10)")
    p.add_argument("--ood-set", default="mnist", help="OOD set the shift shows (default mnist)")
    p.add_argument("--corruption", default="gaussian_noise", help="corruption of the corrupted shift")
    p.add_argument("--severity", type=int, default=3, help="its severity, 1..5 (default 3)")
    p.add_argument("--blocks", type=lambda v: [float(x) for x in v.split(",") if x.strip()], default=[1.0, 10.0],
                   help="block lengths in seconds of the per-time-block candidate, comma-separated (default 1,10; "
                   "'' for none)")
    p.add_argument("--quick", action="store_true", help="small pools and streams (tests)")


@dataclass
class Pool:
    """Encoded clips: per clip, its frames' OOD flags and unit-norm features."""

    flags: list[np.ndarray]  # (n_i,) bool
    features: list[np.ndarray]  # (n_i, D) float32

    @property
    def frames(self) -> int:
        return sum(len(f) for f in self.flags)


@dataclass
class Stream:
    flags: np.ndarray  # (T,) bool
    features: np.ndarray  # (T, D) float32


def _stills(path, n: int, seed: int) -> np.ndarray:
    from dlsr.readers import decode_items, open_images

    images, _, _ = decode_items(open_images(path, limit=n, seed=seed))
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def _encode_pool(bench: common.Setup, detector: Any, clips: list[np.ndarray], label: str) -> Pool:
    from dlsr.readers import array_images

    frames = np.concatenate(clips)
    t0 = time.perf_counter()
    feats = bench.cache.features(bench.encoder, array_images(frames), batch_size=bench.batch_size, progress=False)
    flags = detector.score(feats) > detector.threshold
    print(f"  {label}: {len(clips)} clips, {len(frames)} frames, {flags.mean():.2%} flagged "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    cuts = np.cumsum([len(c) for c in clips])[:-1]
    return Pool(np.split(flags, cuts), np.split(feats.astype(np.float32), cuts))


def _draw(pool: Pool, n: int, rng: np.random.Generator, *, iid: bool) -> Stream:
    """`n` frames: whole clips drawn at random (the last one cut), or (iid) single frames of random clips."""
    if iid:
        c = rng.integers(len(pool.flags), size=n)
        f = np.array([rng.integers(len(pool.flags[i])) for i in c])
        return Stream(np.array([pool.flags[i][j] for i, j in zip(c, f, strict=True)]),
                      np.stack([pool.features[i][j] for i, j in zip(c, f, strict=True)]))
    flags, feats, t = [], [], 0
    while t < n:
        i = int(rng.integers(len(pool.flags)))
        k = min(len(pool.flags[i]), n - t)
        flags.append(pool.flags[i][:k])
        feats.append(pool.features[i][:k])
        t += k
    return Stream(np.concatenate(flags), np.concatenate(feats))


def _concat(a: Stream, b: Stream) -> Stream:
    return Stream(np.concatenate([a.flags, b.flags]), np.concatenate([a.features, b.features]))


def _run_test(test: Any, flags: np.ndarray, units: np.ndarray, args: argparse.Namespace, mon: Any,
              reset_at: int | None = None) -> list[int]:
    """Frames (indices) at which the test raised, evaluated every `eval_every` frames on the service's bucketed
    event-time window; counting `units` (bool per frame) and their flags."""
    n = len(flags)
    frames_per_bucket = args.fps * mon.bucket_s
    bucket = (np.arange(n) // frames_per_bucket).astype(np.int64)
    c_img = np.concatenate([[0], np.cumsum(units)])
    c_ood = np.concatenate([[0], np.cumsum(units & flags)])
    first_of = np.searchsorted(bucket, np.arange(bucket[-1] + 1))  # first frame of each bucket
    state, raises = "ok", []
    for t in range(args.eval_every - 1, n, args.eval_every):
        if reset_at is not None and t - args.eval_every < reset_at <= t:
            state = "ok"
        lo = first_of[max(0, bucket[t] - mon.window_buckets + 1)]
        d = test.evaluate(state, int(c_img[t + 1] - c_img[lo]), int(c_ood[t + 1] - c_ood[lo]))
        if d.changed and d.state == "raised":
            raises.append(t)
        state = d.state
    return raises


def _units(stream: Stream, mon: Any, fps: float, new: bool | float) -> np.ndarray:
    """Which frames count as evidence: all (old), one per new scene (new), or (a float) the first frame of each
    block of that many seconds (the per-time-block candidate, measured for comparison)."""
    from dlsr_monitor.monitor.scenes import SceneTracker

    if new is False:
        return np.ones(len(stream.flags), dtype=bool)
    if new is not True:
        return np.arange(len(stream.flags)) % max(1, round(float(new) * fps)) == 0
    tracker = SceneTracker(mon.drift_scene_distance, mon.drift_scene_max_s, 1)
    ts = np.arange(len(stream.flags)) / fps
    return tracker.new_units(["cam"] * len(ts), ts, stream.features)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.corruptions import corrupt_batch
    from dlsr.detector import DLSRConfig, DLSRDetector
    from dlsr.video import VideoConfig, clip_lengths, render_clip
    from dlsr_monitor.config.settings import MonitorSettings
    from dlsr_monitor.monitor.drift import DriftTest

    t_start = time.perf_counter()
    if args.quick:
        args.pool_clips, args.shift_clips = min(args.pool_clips, 12), min(args.shift_clips, 4)
        args.frames, args.seeds = min(args.frames, 20_000), min(args.seeds, 1)
        args.shift_at, args.after = min(args.shift_at, 20_000), min(args.after, 6_000)
        args.train_size, args.cal_size, args.epochs = min(args.train_size, 600), min(args.cal_size, 300), 2
    mon = settings.monitor if settings is not None else MonitorSettings()
    model = getattr(settings, "model", None)
    demo = getattr(settings, "demo", None)
    alpha = args.alpha or (demo.alpha if demo else 0.05)
    bench = common.setup(args, settings)
    root = bench.root
    from dlsr.readers import array_images

    fit_x = bench.load(common.ID_SET, "train", args.train_size).features
    config = DLSRConfig(score=model.score if model else "mfsim5", n_blocks=4, width=512, epochs=args.epochs,
                        batch_size=128)
    detector = DLSRDetector(bench.encoder, config=config, device=bench.device, boundaries=bench.encoder.boundaries)
    detector.fit(fit_x, progress=False)

    video = VideoConfig()
    crng = np.random.default_rng(1)
    n_stills = args.pool_clips + args.shift_clips
    ids = _stills(root / common.ID_SET / "test.zip", n_stills + args.cal_size, seed=1)
    ids = ids[np.random.default_rng(2).permutation(len(ids))]
    ood = _stills(root / args.ood_set / "test.zip", args.shift_clips, seed=1)
    # Calibrate on what the camera sends: one frame at a random point of a clip of each calibration image (the
    # video's jitter, zoom and noise move scores; a threshold from stills would flag its ID frames above alpha).
    cal_frames = np.stack([render_clip(im, int(n), crng, video)[-1]
                           for im, n in zip(ids[n_stills:], crng.integers(1, video.max_frames + 1,
                                                                          size=len(ids) - n_stills), strict=True)])
    cal_x = bench.cache.features(bench.encoder, array_images(cal_frames), batch_size=bench.batch_size,
                                 progress=False)
    detector.calibrate(cal_x, alpha=alpha)
    print(f"  model: DLSR ({config.score}) on {len(fit_x)} CIFAR-10 train features at {bench.encoder.input_size}px, "
          f"calibrated on {len(cal_x)} video frames of other CIFAR-10 test images (alpha {alpha})",
          file=sys.stderr, flush=True)

    def clips_of(stills: np.ndarray) -> list[np.ndarray]:
        lengths = clip_lengths(len(stills), crng, video)
        return [render_clip(im, int(n), crng, video) for im, n in zip(stills, lengths, strict=True)]

    id_pool = _encode_pool(bench, detector, clips_of(ids[: args.pool_clips]), "ID clips")
    ood_pool = _encode_pool(bench, detector, clips_of(ood), f"{args.ood_set} clips")
    corrupt_clips = [corrupt_batch(c, args.corruption, args.severity, seed=k)
                     for k, c in enumerate(clips_of(ids[args.pool_clips : n_stills]))]
    corrupt_pool = _encode_pool(bench, detector, corrupt_clips, f"{args.corruption}-{args.severity} clips")

    test = DriftTest(alpha=alpha, null_factor=mon.drift_null_factor, raise_p=mon.drift_raise_p,
                     clear_p=mon.drift_clear_p, min_images=mon.drift_min_images)
    rows, candidates = [], []
    tests: list[tuple[str, bool | float]] = [("old", False), ("new", True)]
    tests += [(f"block {b:g}s", b) for b in args.blocks]
    for stream_kind in ("iid", "video"):
        iid = stream_kind == "iid"
        for name, new in tests:
            false, delays = [], {"ood": [], "corrupt": []}
            for seed in range(args.seeds):
                srng = np.random.default_rng([seed, int(iid)])
                clean = _draw(id_pool, args.frames, srng, iid=iid)
                false.append(len(_run_test(test, clean.flags, _units(clean, mon, args.fps, new), args, mon)))
                for kind, shifted in (("ood", ood_pool), ("corrupt", corrupt_pool)):
                    s = _concat(_draw(id_pool, args.shift_at, srng, iid=iid),
                                _draw(shifted, args.after, srng, iid=iid))
                    raised = [t for t in _run_test(test, s.flags, _units(s, mon, args.fps, new), args, mon,
                                                   reset_at=args.shift_at) if t >= args.shift_at]
                    delays[kind].append(raised[0] - args.shift_at + 1 if raised else None)
            (rows if name in ("old", "new") else candidates).append({
                "test": name,
                "stream": stream_kind,
                "false_alarms_per_100k": round(float(np.mean(false)) * 100_000 / args.frames, 2),
                "false_alarms_per_seed": false,
                "delay_ood_frames": _mean_delay(delays["ood"]),
                "delay_corrupt_frames": _mean_delay(delays["corrupt"]),
                "delays_ood": delays["ood"],
                "delays_corrupt": delays["corrupt"],
            })
    meta = {
        "commit": common.git_commit(),
        "device": common.device_name(bench.device),
        "alpha": alpha,
        "threshold": float(detector.threshold),
        "drift": {"null_factor": mon.drift_null_factor, "raise_p": mon.drift_raise_p,
                  "clear_p": mon.drift_clear_p, "min_images": mon.drift_min_images, "bucket_s": mon.bucket_s,
                  "window_buckets": mon.window_buckets, "scene_distance": mon.drift_scene_distance,
                  "scene_max_s": mon.drift_scene_max_s},
        "fps": args.fps, "frames": args.frames, "seeds": args.seeds, "eval_every": args.eval_every,
        "shift_at": args.shift_at, "after": args.after, "ood_set": args.ood_set,
        "corruption": f"{args.corruption}-{args.severity}",
        "pool": {"id_clips": len(id_pool.flags), "id_frames": id_pool.frames,
                 "id_flag_rate": float(np.mean(np.concatenate(id_pool.flags))),
                 "ood_flag_rate": float(np.mean(np.concatenate(ood_pool.flags))),
                 "corrupt_flag_rate": float(np.mean(np.concatenate(corrupt_pool.flags)))},
        "seconds": round(time.perf_counter() - t_start, 1),
        "candidates": candidates,  # evidence per time block: the first frame of each block counts
    }
    print(f"\nDrift on correlated video, {args.seeds} seed(s) x {args.frames} frames per stream at {args.fps:g} fps; "
          f"streams drawn as whole clips from a pool of {id_pool.frames} encoded ID frames in {len(id_pool.flags)} "
          f"clips ({meta['pool']['id_flag_rate']:.2%} flagged at alpha {alpha}); shifts at frame {args.shift_at} to "
          f"{args.ood_set} clips ({meta['pool']['ood_flag_rate']:.0%} flagged) or {meta['corruption']} clips "
          f"({meta['pool']['corrupt_flag_rate']:.0%} flagged); old = every frame, new = one unit per scene")
    headers = ["test", "stream", "false alarms / 100k frames", "per seed", "delay OOD (frames)",
               "delay corrupt (frames)"]

    def table(rs: list[dict]) -> str:
        return common.markdown_table(headers, [
            [r["test"], r["stream"], r["false_alarms_per_100k"], r["false_alarms_per_seed"],
             _fmt(r["delay_ood_frames"], r["delays_ood"]), _fmt(r["delay_corrupt_frames"], r["delays_corrupt"])]
            for r in rs])

    print(table(rows))
    if candidates:
        print("\nOther candidate (not the product): evidence per time block, the first frame of each block counts")
        print(table(candidates))
    if args.json:
        common.write_json(args.json, {"rows": rows, "meta": meta})
        print(f"wrote {args.json}")
    return 0


def _mean_delay(delays: list[int | None]) -> float | None:
    """Mean delay over the streams that raised; None when none did."""
    got = [d for d in delays if d is not None]
    return round(float(np.mean(got)), 1) if got else None


def _fmt(mean: float | None, delays: list[int | None]) -> str:
    missed = sum(d is None for d in delays)
    text = "never" if mean is None else f"{mean:g}"
    return text + (f" ({missed}/{len(delays)} never)" if missed and mean is not None else "")
