"""`dlsr bench speed --runtimes torch,openvino,onnxruntime`: the encoder's runtimes side by side, in one process.

Every configuration (runtime, precision, OpenVINO streams) sees the same real images (CIFAR-10 test JPEGs, so
decoding is real), the same batch sizes, the same torch threads and the same LFDN head (built with 0 epochs on
random features: speed does not depend on trained values). Timings interleave the configurations round-robin
and keep the median of `--repeats`, so load from other processes hits all of them alike; read the ratios, not
the absolute figures, on a shared machine (the load average is recorded).

Per configuration and batch size:
  decode    decode_image + encoder.preprocess of the batch (one thread)
  encoder   encoder.encode_pixels (the runtime + pooling + z-score)
  head      the LFDN + score on the features (torch)
  images_s  the monitor's loop: decode of batch k+1 on `decode_threads` threads while batch k is scored
            (encoder + head), so it includes any contention between the runtime's threads and the decoders
A configuration is `runtime[:precision[:streams[:threads]]]`, e.g. `openvino:bf16`, `openvino:fp32:2`,
`onnxruntime:fp32::1` (one intra-op thread, leaving a core to the decoders), `onnxruntime:int8` (quantized with
CALIBRATION_IMAGES CIFAR-10 train images: the speed of an int8 graph does not depend on which).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.bench import common

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


@dataclass(frozen=True)
class Config:
    runtime: str
    precision: str
    streams: int = 1
    threads: int | None = None  # a CPU runtime's intra-op threads (None: torch's)

    @property
    def label(self) -> str:
        out = f"{self.runtime} {self.precision}" + (f" x{self.streams} streams" if self.streams > 1 else "")
        return out + (f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "")


def parse_configs(text: str, default_precision: str = "fp32") -> list[Config]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        runtime = parts[0]
        precision = parts[1] if len(parts) > 1 and parts[1] else default_precision
        streams = int(parts[2]) if len(parts) > 2 and parts[2] else 1
        threads = int(parts[3]) if len(parts) > 3 and parts[3] else None
        if runtime == "torch" and (streams != 1 or threads):
            raise SystemExit(f"dlsr bench speed: {item!r}: torch takes no streams or threads (torch.set_num_threads)")
        if precision not in ("fp32", "bf16", "int8"):
            raise SystemExit(f"dlsr bench speed: precision of {item!r} must be fp32, bf16 or int8")
        out.append(Config(runtime, precision, streams, threads))
    if not out:
        raise SystemExit("dlsr bench speed: --runtimes names no runtime")
    return out


CALIBRATION_IMAGES = 256


def _calibration(args: argparse.Namespace) -> list:
    from dlsr.images import decode_image

    return [decode_image(p) for p in _images(args, CALIBRATION_IMAGES, split="train")]


def _images(args: argparse.Namespace, n: int, split: str = "test") -> list[bytes]:
    from dlsr.readers import open_images

    path = (args.data_dir or common.default_data_dir()) / "cifar10" / f"{split}.zip"
    if not path.is_file():
        raise SystemExit(f"dlsr bench speed --runtimes: no {path}: pass --data-dir or set DLSR_TEST_DATA")
    return [it.data for it in open_images(path, limit=n, seed=0)]


def _decode(encoder: Any, payloads: list[bytes]):
    from dlsr.images import decode_image

    return encoder.preprocess([decode_image(p) for p in payloads])


def _decode_parallel(pool: ThreadPoolExecutor, encoder: Any, payloads: list[bytes], threads: int):
    # As the monitor does: the batch's images are decoded and preprocessed on `threads` workers.
    import torch

    chunks = [payloads[i::threads] for i in range(threads) if payloads[i::threads]]
    parts = list(pool.map(lambda c: _decode(encoder, c), chunks))
    out = torch.empty((len(payloads), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for i, part in enumerate(parts):
        out[i::len(parts)] = part
    return out


def measure(
    encoder: Any, det: Any, payloads: list[bytes], batch_size: int, n_batches: int, pool: ThreadPoolExecutor,
    decode_threads: int,
) -> dict[str, float]:
    """Seconds per image of decode, encoder, head (each alone) and of the overlapped monitor-like loop."""
    import torch

    batches = [payloads[(i * batch_size) % len(payloads) :][:batch_size] for i in range(n_batches)]
    batches = [b if len(b) == batch_size else (b + payloads)[:batch_size] for b in batches]
    n = n_batches * batch_size
    with torch.inference_mode():
        t0 = time.perf_counter()
        pixels = [_decode(encoder, b) for b in batches]
        t_dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = [encoder.encode_pixels(x) for x in pixels]
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for f in feats:
            det._score_tensor(f)
        t_head = time.perf_counter() - t0
        t0 = time.perf_counter()
        nxt = pool.submit(_decode_parallel, pool, encoder, batches[0], decode_threads)
        for k in range(n_batches):
            x = nxt.result()
            if k + 1 < n_batches:  # batch k+1 is decoded while batch k is scored
                nxt = pool.submit(_decode_parallel, pool, encoder, batches[k + 1], decode_threads)
            det._score_tensor(encoder.encode_pixels(x))
        t_loop = time.perf_counter() - t0
    return {"decode": t_dec / n, "encoder": t_enc / n, "head": t_head / n, "loop": t_loop / n}


def _trim_heap() -> None:
    # Hand freed heap pages back after each timing (glibc keeps them): seven backbones' peaks in one process
    # would otherwise add up (batch 256 ran out of 24 GB before this and the arena limit).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    import torch

    from dlsr_monitor.monitor.service import limit_heap_growth

    limit_heap_growth()  # the monitor's allocator setting (at most 2 malloc arenas), as `bench throughput` does
    configs = parse_configs(args.runtimes, args.precision or "fp32")
    if Config("torch", "fp32") not in configs:
        configs.insert(0, Config("torch", "fp32"))  # the reference every ratio is taken against
    sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    decode_threads = args.decode_threads or (settings.monitor.decode_threads if settings else 2)
    load_start = os.getloadavg()
    encoders: dict[Config, Any] = {}
    for c in configs:
        t0 = time.perf_counter()
        args_c = argparse.Namespace(**{**vars(args), "streams": c.streams})
        encoders[c] = common.make_encoder(
            args_c, settings, runtime=c.runtime, precision=c.precision, threads=c.threads,
            calibration=_calibration(args) if c.precision == "int8" else None,
        )
        print(f"  {c.label}: ready in {time.perf_counter() - t0:.1f} s "
              f"({encoders[c].runtime.describe()})", file=sys.stderr, flush=True)
    ref = encoders[Config("torch", "fp32")]
    rng = np.random.default_rng(0)
    det = common.make_dlsr(
        argparse.Namespace(
            t=args.t, ddim_steps=None, n_draws=1, n_blocks=args.n_blocks, width=None, epochs=0, train_batch=256,
            lr=None, weight_decay=0.02, ema_decay=0.999, score_batch=1024,
        ),
        ref.boundaries, 0, "cpu", score=args.score, progress=False, encoder=ref,
    )
    det.fit(rng.standard_normal((512, ref.dim)).astype(np.float32))
    payloads = _images(args, max(sizes))
    rows, table = [], []
    with ThreadPoolExecutor(max_workers=decode_threads + 1, thread_name_prefix="bench-decode") as pool:
        for bs in sizes:
            n_batches = max(args.batches, math.ceil(args.min_images / bs))
            for enc in encoders.values():  # warm-up: allocations, first-call compilation
                measure(enc, det, payloads, bs, 1, pool, decode_threads)
            times: dict[Config, list[dict[str, float]]] = {c: [] for c in configs}
            for _ in range(args.repeats):
                for c, enc in encoders.items():
                    times[c].append(measure(enc, det, payloads, bs, n_batches, pool, decode_threads))
                    _trim_heap()
            med = {c: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for c, ts in times.items()}
            base = 1.0 / med[Config("torch", "fp32")]["loop"]
            for c in configs:
                m = med[c]
                ips, total = 1.0 / m["loop"], m["decode"] + m["encoder"] + m["head"]
                row = {
                    "runtime": c.runtime,
                    "precision": c.precision,
                    "streams": c.streams,
                    "batch_size": bs,
                    "images_s": ips,
                    "ratio_vs_torch_fp32": ips / base,
                    "encoder_images_s": 1.0 / m["encoder"],
                    "scorer_images_s": 1.0 / (m["encoder"] + m["head"]),
                    "share": {k: m[k] / total for k in ("decode", "encoder", "head")},
                }
                rows.append(row)
                sh = row["share"]
                table.append([
                    c.label, bs, f"{ips:,.1f}", f"{row['ratio_vs_torch_fp32']:.2f}x", f"{row['encoder_images_s']:,.1f}",
                    f"{row['scorer_images_s']:,.1f}",
                    f"{100 * sh['decode']:.0f} / {100 * sh['encoder']:.0f} / {100 * sh['head']:.0f} %",
                ])
                print(f"  batch {bs} {c.label}: {ips:,.1f} images/s ({row['ratio_vs_torch_fp32']:.2f}x)",
                      file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    cpu = common.device_name("cpu")
    print(
        f"\n### Encoder runtimes: {ref.name} @{ref.input_size}, LFDN {args.n_blocks} blocks, {args.score} at "
        f"t={args.t}; {cpu} (torch and, unless the row says otherwise, the CPU runtimes), "
        f"{decode_threads} decode threads; load average {load_start[0]:.1f} -> {load_end[0]:.1f}\n"
    )
    print(common.markdown_table(
        ["runtime", "batch", "images/s (decode overlapped)", "vs torch fp32", "encoder alone img/s",
         "encoder + head img/s", "time share decode / encoder / head"],
        table,
    ))
    if args.json:
        common.write_json(args.json, {
            "rows": rows,
            "meta": {
                "cpu": cpu,
                "threads": torch.get_num_threads(),
                "runtime_threads": {c.label: encoders[c].runtime.describe().get("threads") for c in configs},
                "decode_threads": decode_threads,
                "backbone": f"{ref.name} @{ref.input_size}",
                "head": {"n_blocks": args.n_blocks, "t": args.t, "score": args.score},
                "batches": {"min_images": args.min_images, "batches": args.batches, "repeats": args.repeats},
                "load_average": {"start": list(load_start), "end": list(load_end)},
                # every configuration's backbone lives in this one process: the sum of their peaks, not one's
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "versions": {c.runtime: encoders[c].runtime.describe().get("version") for c in configs},
            },
        })
    return 0
