"""`dlsr bench input-size`: AUROC and images/s against the encoder's input size for small (32x32) sources.

CIFAR-10 images are 32x32: at the backbone's 224 px they are upsampled 7x per side, 49x the pixels. This sweep
fits the same DLSR (and the Mahalanobis baseline) on the same CIFAR-10 subsets at each input size, scores
CIFAR-10 test (ID) against every OOD set, and times the encoder alone on real CIFAR-10 images in each runtime
asked for. `ModelSettings.input_size = "auto"` picks its size for small sources from these figures
(bench/results/input_size_lite0.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from dlsr_monitor.bench import common
from dlsr_monitor.bench.ood import measure_encoder

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings

METHODS = ("DLSR-MFsim4", "Mahalanobis")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument("--sizes", default="64,96,128,160,224", help="input sizes (default 64,96,128,160,224)")
    p.add_argument("--train-size", type=int, default=4000, help="CIFAR-10 train images fitted on (default 4000)")
    p.add_argument("--cal-size", type=int, default=1000, help="held-out train images for calibration (default 1000)")
    p.add_argument("--id-size", type=int, default=1000, help="CIFAR-10 test images (default 1000)")
    p.add_argument("--ood-size", type=int, default=1000, help="images per OOD set (default 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate of the threshold (default 0.05)")
    p.add_argument(
        "--runtime", default=None, help="runtime that encodes the sets (default: the model.runtime setting)"
    )
    p.add_argument(
        "--speed-runtimes",
        default="torch",
        help="runtimes whose encoder-alone images/s is measured at each size (default torch)",
    )
    p.add_argument("--speed-images", type=int, default=256, help="images per speed timing (default 256)")
    p.add_argument(
        "--speed-only", action="store_true", help="only the encoder images/s per size (no fit, no AUROC)"
    )
    common.add_dlsr_arguments(p, epochs=20, n_blocks=8, t=2)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.cache import FeatureCache
    from dlsr.calibration import conformal_threshold
    from dlsr.metrics import ood_metrics

    t_start = time.perf_counter()
    sizes = _ints(args.sizes)
    speed_runtimes = [r.strip() for r in args.speed_runtimes.split(",") if r.strip()]
    root = common.data_dir(args)
    cache = FeatureCache(common.cache_dir(args, settings))
    ood_names = common.ood_set_names(root)
    device = common.resolve_device(args.device)
    rows_md, rows_json = [], []
    for size in sizes:
        args.input_size = size
        encoder = common.make_encoder(args, settings)
        bench = common.Setup(root, device, encoder, cache, args.batch_size)
        print(f"input size {size}: {encoder.name} ({encoder.runtime_name})", file=sys.stderr, flush=True)
        speeds = {}
        for rt in speed_runtimes:
            enc = encoder if rt == encoder.runtime_name else common.make_encoder(args, settings, runtime=rt)
            speeds[rt] = measure_encoder(enc, root, n=args.speed_images, batch_size=args.batch_size)
        if args.speed_only:
            rows_json.append({"input_size": size, "encoder_images_s": speeds})
            rows_md.append([size, f"{(size / 32) ** 2:.0f}x", "-"] + ["-"] * (len(ood_names) + 1)
                           + [f"{speeds[r]:.1f}" for r in speed_runtimes])  # fmt: skip
            continue
        pool = bench.load(common.ID_SET, "train", args.train_size + args.cal_size)
        id_test = bench.load(common.ID_SET, "test", args.id_size)
        ood = {name: bench.load(name, "test", args.ood_size) for name in ood_names}
        cal_idx, fit_idx = common.split_indices(len(pool.features), args.cal_size, 0)
        x_fit, x_cal = pool.features[fit_idx], pool.features[cal_idx]
        width = args.width or encoder.dim
        det = common.make_dlsr(args, encoder.boundaries, 0, device, width=width, hidden=width, progress=False)
        t0 = time.perf_counter()
        det.fit(x_fit)
        fit_s = time.perf_counter() - t0
        maha = common.make_baselines(args, device, encoder.boundaries)["Mahalanobis"].fit(x_fit)
        parts = {"cal": x_cal, "id": id_test.features} | {k: v.features for k, v in ood.items()}
        scores = {
            "DLSR-MFsim4": {k: det.score_all(v, scores=("mfsim4",))["mfsim4"] for k, v in parts.items()},
            "Mahalanobis": {k: maha.score(v) for k, v in parts.items()},
        }
        for m in METHODS:
            s = scores[m]
            far = float(np.mean(s["id"] > conformal_threshold(s["cal"], args.alpha)))
            auroc = {name: ood_metrics(s["id"], s[name])["auroc"] for name in ood_names}
            rows_json.append(
                {"input_size": size, "method": m, "auroc": auroc, "id_false_alarm": far,
                 "encoder_images_s": speeds, "fit_s": fit_s if m.startswith("DLSR") else None}
            )  # fmt: skip
            rows_md.append(
                [size, f"{(size / 32) ** 2:.0f}x", m]
                + [f"{100 * auroc[n]:.2f}" for n in ood_names]
                + [f"{100 * far:.1f}"]
                + [f"{speeds[r]:.1f}" for r in speed_runtimes]
            )
    wall = time.perf_counter() - t_start
    print(
        f"\n### Input size for 32x32 sources: CIFAR-10 (ID) vs OOD, {common.ID_SET} fit {args.train_size}, "
        f"calibrate {args.cal_size}, ID test {args.id_size}, {args.ood_size} per OOD set; LFDN {args.n_blocks} "
        f"blocks, width {args.width or 'D'}, {args.epochs} epochs, t={args.t}, score mfsim4; seed 0\n"
    )
    headers = ["input size", "pixels vs 32x32", "method"] + [f"AUROC % {n}" for n in ood_names]
    headers += [f"ID false alarms % (alpha={args.alpha})"] + [f"encoder img/s {r}" for r in speed_runtimes]
    print(common.markdown_table(headers, rows_md))
    print(
        f"\nEncoder alone (preprocess + forward) at batch {args.batch_size} on {common.device_name(device)}, "
        f"{args.speed_images} CIFAR-10 test images per timing. Wall time {wall / 60:.1f} min."
    )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "git_commit": common.git_commit(),
            "device": common.device_name(device),
            "encoder": args.backbone or (settings.model.encoder if settings else "tf_efficientnet_lite0"),
            "sizes": sizes,
            "ood_sets": ood_names,
            "n_fit": args.train_size,
            "n_cal": args.cal_size,
            "n_id_test": args.id_size,
            "n_ood": args.ood_size,
            "alpha": args.alpha,
            "dlsr": {"epochs": args.epochs, "n_blocks": args.n_blocks, "width": args.width, "t": args.t},
            "wall_s": wall,
        }
        common.write_json(args.json, {"rows": rows_json, "meta": meta})
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0
