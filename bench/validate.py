"""`dlsr bench validate`: choose DLSR settings without looking at any test OOD set.

Validation split, built from CIFAR-10 *train* only:
- near-OOD proxy: hold out whole classes (default cat and truck); fit on the other classes, ID = held-out
  images of the fitted classes, OOD = images of the held-out classes;
- far-OOD proxy: code-made corruptions (dlsr.corruptions, severity 5) of the ID validation images.
For each LFDN configuration (blocks x epochs) one model is trained; every t and every score is evaluated on it.
kNN and Mahalanobis run on the same split for reference.
"""

from __future__ import annotations

import argparse
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
    common.add_data_arguments(p)
    p.add_argument("--pool-size", type=int, default=5000, help="CIFAR-10 train images used (default 5000)")
    p.add_argument("--holdout", default="cat,truck", help="classes held out as near-OOD (default cat,truck)")
    p.add_argument(
        "--val-size", type=int, default=600, help="ID validation images, also corrupted (default 600)"
    )
    p.add_argument(
        "--corruptions",
        default="gaussian_noise,pixelate,contrast,gaussian_blur",
        help="far-OOD proxy corruptions at severity 5",
    )
    p.add_argument("--blocks-list", default="8,16", help="LFDN depths to try (default 8,16)")
    p.add_argument("--epochs-list", default="5,10,20", help="training epochs to try (default 5,10,20)")
    p.add_argument("--t-list", default="1,2,3,5,8,10,15,20", help="noise levels to score at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cal-size",
        type=int,
        default=0,
        help="images of the fitted classes held out of the fit to calibrate the fused scores (dlsr.fusion), which "
        "are then validated too (default 0: no fused scores)",
    )
    common.add_fusion_argument(p)
    common.add_dlsr_arguments(p, epochs=None, n_blocks=16, t=5)


def corrupted_features(
    cache, encoder, root, names: list[str], corruptions: list[str], severity: int, seed: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Features of code-corrupted copies of the named CIFAR-10 train images (cached like any image)."""
    from dlsr.corruptions import corrupt_batch
    from dlsr.readers import MemoryImageSet, array_images, decode_items, open_images

    wanted = set(names)
    items = [it for it in open_images(root / common.ID_SET / "train.zip") if it.name in wanted]
    images, kept, _ = decode_items(MemoryImageSet(items))
    arr = np.stack([np.asarray(im) for im in images])
    out = {}
    for c in corruptions:
        bad = corrupt_batch(arr, c, severity, seed=seed)
        res = cache.extract(
            encoder,
            array_images(bad, names=[f"{c}{severity}/{n}" for n in kept]),
            batch_size=batch_size,
            progress=True,
        )
        out[f"{c}{severity}"] = res.features
    return out


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.metrics import auroc

    t_start = time.perf_counter()
    bench = common.setup(args, settings)
    root, device, encoder, cache = bench.root, bench.device, bench.encoder, bench.cache
    pool = bench.load(common.ID_SET, "train", args.pool_size)
    fit_idx, val_idx, is_held, held = common.holdout_split(pool.names, args.holdout, args.val_size, args.seed)
    fused = common.fused_methods(args, ["DLSR-MFsim4", "Mahalanobis"]) if args.cal_size > 0 else []
    cal_idx = np.array([], dtype=int)
    if fused:
        cal_idx = np.sort(np.random.default_rng(args.seed + 1).choice(fit_idx, size=args.cal_size, replace=False))
        fit_idx = np.setdiff1d(fit_idx, cal_idx)
    x_fit, x_val, x_cal = pool.features[fit_idx], pool.features[val_idx], pool.features[cal_idx]
    ood = {"held-out classes": pool.features[is_held]}
    corr = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    ood |= corrupted_features(
        cache, encoder, root, [pool.names[i] for i in val_idx], corr, 5, args.seed, args.batch_size
    )
    far_keys = [k for k in ood if k != "held-out classes"]
    n_classes = len({pool.names[i].split("/")[0] for i in fit_idx})
    print(
        f"validate: fit {len(x_fit)} ({n_classes} classes), ID val {len(x_val)}, "
        f"near proxy {len(ood['held-out classes'])} ({', '.join(held)}), far proxy {far_keys}",
        file=sys.stderr,
    )

    rows = []

    def record(label: str, s_val: np.ndarray, s_ood: dict[str, np.ndarray]) -> None:
        near = auroc(s_val, s_ood["held-out classes"])
        far = [auroc(s_val, s_ood[k]) for k in far_keys]
        rows.append(
            [label, f"{100 * near:.2f}", f"{100 * np.mean(far):.2f}"] + [f"{100 * f:.2f}" for f in far]
        )

    # per-stage scores of the fusion sources: method -> split ("cal", "val", each OOD proxy) -> (N, S)
    stages: dict[str, dict[str, np.ndarray]] = {}
    parts = {"cal": x_cal, "val": x_val} | ood

    def record_fused(sources: set[str], prefix: str) -> None:
        chosen = [m for m in fused if set(common.fusion_sources(m)) == sources]
        for m, s in common.fused_scores(chosen, stages, args.seed).items():
            record(f"{prefix}{m}", s["val"], {k: s[k] for k in ood})

    for name, det in common.make_baselines(args, device, encoder.boundaries).items():
        det.fit(x_fit)
        record(name, det.score(x_val), {k: det.score(v) for k, v in ood.items()})
        if name == "Mahalanobis" and fused:
            stages[name] = {k: det.score_stages(v) for k, v in parts.items()}
            stages[f"{name}:main"] = {k: det.score(v)[:, None] for k, v in parts.items()}
            record_fused({name}, "")
            record_fused({name, f"{name}:main"}, "")
    t_list = _ints(args.t_list)
    for blocks in _ints(args.blocks_list):
        for epochs in _ints(args.epochs_list):
            det = common.make_dlsr(
                args, encoder.boundaries, args.seed, device, n_blocks=blocks, epochs=epochs
            )
            t0 = time.perf_counter()
            det.fit(x_fit)
            fit_s = time.perf_counter() - t0
            for t in t_list:
                s_val = det.score_all(x_val, t=t, stages=bool(fused))
                s_ood = {k: det.score_all(v, t=t, stages=bool(fused)) for k, v in ood.items()}
                label = f"DLSR {blocks} blocks, {epochs} ep ({fit_s:.0f}s), t={t}"
                for score in ("mse", "mfsim5", "mfsim4"):
                    record(f"{label}, {score}", s_val[score], {k: v[score] for k, v in s_ood.items()})
                if fused:
                    s_cal = det.score_all(x_cal, t=t, stages=True)
                    stages["DLSR-MFsim4"] = {"cal": s_cal["mfsim4:stages"], "val": s_val["mfsim4:stages"]}
                    stages["DLSR-MFsim4"] |= {k: v["mfsim4:stages"] for k, v in s_ood.items()}
                    stages["DLSR-MFsim4:main"] = {"cal": s_cal["mfsim4"][:, None], "val": s_val["mfsim4"][:, None]}
                    stages["DLSR-MFsim4:main"] |= {k: v["mfsim4"][:, None] for k, v in s_ood.items()}
                    record_fused({"DLSR-MFsim4"}, f"{label}, ")
                    record_fused({"DLSR-MFsim4", "Mahalanobis"}, f"{label}, ")
                    both_main = {"DLSR-MFsim4", "Mahalanobis", "DLSR-MFsim4:main", "Mahalanobis:main"}
                    record_fused(both_main, f"{label}, ")
            print(f"  done {blocks} blocks x {epochs} epochs", file=sys.stderr, flush=True)

    headers = ["configuration", "AUROC % held-out classes", "AUROC % corruptions (mean)"] + [
        f"AUROC % {k}" for k in far_keys
    ]
    print(
        f"\n### Validation (CIFAR-10 train only): {encoder.name} @{encoder.input_size}, fit {len(x_fit)}, "
        f"ID val {len(x_val)}, held-out classes {', '.join(held)}"
        + (f"; fused scores calibrated on {len(x_cal)} held-out images of the fitted classes" if fused else "")
        + "\n"
    )
    print(common.markdown_table(headers, rows))
    print(f"\nWall time {(time.perf_counter() - t_start) / 60:.1f} min on {common.device_name(device)}.")
    if args.json:
        common.write_json(args.json, {"headers": headers, "rows": rows})
    return 0
