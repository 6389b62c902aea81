"""`dlsr bench corruptions`: the data-quality angle. CIFAR-10 test images corrupted by code (dlsr.corruptions)
are scored against the same images clean; AUROC per corruption and severity, for DLSR and the baselines.

The detectors are fitted on CIFAR-10 train features (one seed). Corrupted copies are cached like any other
image (keyed by their bytes), so a rerun only scores. With a calibration split (--cal-size more train images,
not fitted on) it also prints, for the --shift-methods, the shift (dlsr.evidence) that the per-stage p-values
give each image flagged at the conformal threshold (--alpha), per corruption and severity.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.bench import common
from dlsr_monitor.bench.ood import DEFAULT_BLOCKS, DEFAULT_EPOCHS, DEFAULT_T

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


def _names() -> list[str]:
    # Kept in sync with dlsr.corruptions.CORRUPTIONS (checked in run()); listed here so --help needs no numpy/PIL.
    return ["gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast", "pixelate", "occlusion"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument(
        "--train-size", type=int, default=10000, help="CIFAR-10 train images to fit (default 10000)"
    )
    p.add_argument(
        "--id-size", type=int, default=1000, help="CIFAR-10 test images, each corrupted (default 1000)"
    )
    p.add_argument("--corruptions", default=",".join(_names()), help="comma-separated corruption names")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (default 1..5)")
    p.add_argument("--methods", default="DLSR-MFsim5,DLSR-MFsim4,DLSR-MSE,kNN,Mahalanobis")
    p.add_argument("--seed", type=int, default=0, help="seeds the LFDN and the random corruptions")
    p.add_argument(
        "--cal-size",
        type=int,
        default=1000,
        help="further CIFAR-10 train images (not fitted on) that calibrate the threshold and the per-stage p-values "
        "of the shift table (default 1000; 0 = no shift table)",
    )
    p.add_argument(
        "--alpha", type=float, default=0.05, help="false-alarm rate of the threshold that flags images (default 0.05)"
    )
    common.add_shift_argument(p)
    common.add_fusion_argument(p)
    common.add_dlsr_arguments(p, epochs=DEFAULT_EPOCHS, n_blocks=DEFAULT_BLOCKS, t=DEFAULT_T)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.calibration import conformal_threshold
    from dlsr.corruptions import CORRUPTIONS, corrupt_batch
    from dlsr.metrics import auroc
    from dlsr.readers import array_images, decode_items, open_images

    t_start = time.perf_counter()
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        print(
            f"dlsr bench corruptions: unknown corruption(s) {unknown}; choose from {sorted(CORRUPTIONS)}",
            file=sys.stderr,
        )
        return 2
    severities = [int(s) for s in args.severities.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    fused = common.fused_methods(args, methods) if args.cal_size > 0 else []
    all_methods = [*methods, *fused]
    bench = common.setup(args, settings)
    root, device, encoder, cache = bench.root, bench.device, bench.encoder, bench.cache
    train_split = bench.load(common.ID_SET, "train", args.train_size)
    train = train_split.features
    shift_methods = common.shift_methods(args, methods) if args.cal_size > 0 else []
    need_stages = set(shift_methods) | common.stage_methods(fused)
    x_cal = None
    if args.cal_size > 0:
        # Seeded subsets are nested: the larger one holds every fitted image; the others calibrate.
        pool = bench.load(common.ID_SET, "train", args.train_size + args.cal_size)
        fitted = set(train_split.names)
        x_cal = pool.features[[i for i, n in enumerate(pool.names) if n not in fitted]]
    clean_set = open_images(root / common.ID_SET / "test.zip", limit=args.id_size, seed=0)
    clean = cache.extract(encoder, clean_set, batch_size=args.batch_size, progress=True)
    pixels, names, _ = decode_items(it for it in clean_set if it.name in set(clean.names))
    arr = np.stack([np.asarray(im) for im in pixels])

    dets: dict[str, Any] = {}
    dlsr_scores = {m: common.DLSR_SCORES[m] for m in methods if m in common.DLSR_SCORES}
    if dlsr_scores:
        dets["DLSR"] = common.make_dlsr(args, encoder.boundaries, args.seed, device).fit(train)
    for m, det in common.make_baselines(args, device, encoder.boundaries).items():
        if m in methods:
            dets[m] = det.fit(train)

    def score(x: np.ndarray) -> dict[str, np.ndarray]:
        """method -> (N,) scores, and "<method>:stages" -> (N, S) for the shift methods and fusion sources."""
        out = {}
        if "DLSR" in dets:
            with_stages = any(m in need_stages for m in dlsr_scores)
            s = dets["DLSR"].score_all(x, scores=tuple(dlsr_scores.values()), stages=with_stages)
            out |= {m: s[name] for m, name in dlsr_scores.items()}
            out |= {f"{m}:stages": s[f"{name}:stages"] for m, name in dlsr_scores.items() if m in need_stages}
        out |= {m: d.score(x) for m, d in dets.items() if m != "DLSR"}
        out |= {f"{m}:stages": d.score_stages(x) for m, d in dets.items() if m != "DLSR" and m in need_stages}
        return out

    def with_fused(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`s` plus the fused statistics (calibrated on the calibration split's stage scores)."""
        return s | {
            m: fusions[m].statistic(np.hstack([common.source_columns(s, src) for src in common.fusion_sources(m)]))
            for m in fused
        }

    s_cal = score(x_cal) if x_cal is not None else {}
    fusions = common.fit_fusions(fused, s_cal, args.seed)
    # shift[method] -> [(corruption, severity, counts)]; the clean images first (their flags are false alarms)
    shift: dict[str, list[tuple[str, str, dict[str, int]]]] = {m: [] for m in shift_methods}

    def add_shift(corruption: str, severity: str, s: dict[str, np.ndarray]) -> None:
        for m in shift_methods:
            counts = common.shift_counts(s_cal[m], s_cal[f"{m}:stages"], s[m], s[f"{m}:stages"], args.alpha)
            shift[m].append((corruption, severity, counts))

    s_clean = with_fused(score(clean.features))
    add_shift("none (clean ID)", "-", s_clean)
    rows, out_rows = [], []
    for c in corruptions:
        for sev in severities:
            bad = corrupt_batch(arr, c, sev, seed=args.seed)
            res = cache.extract(
                encoder,
                array_images(bad, names=[f"{c}{sev}/{n}" for n in names]),
                batch_size=args.batch_size,
                progress=True,
            )
            s_bad = with_fused(score(res.features))
            add_shift(c, str(sev), s_bad)
            vals = {m: auroc(s_clean[m], s_bad[m]) for m in all_methods}
            rows.append([c, sev] + [f"{100 * vals[m]:.2f}" for m in all_methods])
            out_rows.append({"corruption": c, "severity": sev, "auroc": vals})
            print(
                f"  {c} {sev}: " + ", ".join(f"{m} {100 * v:.1f}" for m, v in vals.items()),
                file=sys.stderr,
                flush=True,
            )
    mean_auroc = {m: float(np.mean([r["auroc"][m] for r in out_rows])) for m in all_methods}
    mean_row = ["mean", "all"] + [f"{100 * mean_auroc[m]:.2f}" for m in all_methods]
    # False alarms on the clean ID images at the conformal threshold from the calibration split, per method.
    false_alarms = {}
    if x_cal is not None:
        cal_stats = {m: s_cal[m] for m in methods} | {m: fusions[m].calibration for m in fused}
        false_alarms = {m: float(np.mean(s_clean[m] > conformal_threshold(cal_stats[m], args.alpha)))
                        for m in all_methods}
    wall = time.perf_counter() - t_start
    print(
        f"\n### Corrupted vs clean CIFAR-10 test ({len(arr)} images): {encoder.name} @{encoder.input_size}, "
        f"fit {len(train)} train, LFDN {args.n_blocks} blocks, {args.epochs} epochs, t={args.t}; AUROC %\n"
    )
    fa_row = ["false alarms % (clean ID)", f"alpha={args.alpha}"] + [
        f"{100 * false_alarms[m]:.1f}" if m in false_alarms else "-" for m in all_methods
    ]
    print(common.markdown_table(["corruption", "severity"] + all_methods, rows + [mean_row, fa_row]))
    if fused:
        by_method = [{"method": m, "set": "mean of the cells", "auroc": v} for m, v in mean_auroc.items()]
        by_method += [{"method": m, "set": f"{r['corruption']} {r['severity']}", "auroc": r["auroc"][m]}
                      for r in out_rows if r["severity"] == max(severities) for m in all_methods]
        print("\n### Fused vs single scores: AUROC % (the mean of all cells, then each corruption at the top severity)\n")
        print(common.markdown_table(*common.fusion_comparison(by_method, methods, fused, key="set")))
        print(f"\n{common.FUSION_NOTE}.")
    shift_md, shift_rows = [], []
    for m in shift_methods:
        corrupted = [counts for c, _, counts in shift[m] if c != "none (clean ID)"]
        for c, sev, counts in [*shift[m], ("all corrupted", "all", common.pool_counts(corrupted))]:
            shift_md.append([m, c, sev, *common.shift_cells(counts)])
            shift_rows.append({"method": m, "corruption": c, "severity": sev, **common.shift_json(counts)})
    if shift_methods:
        print(
            f"\n### Shift among flagged images: alpha={args.alpha}, calibrated on {len(x_cal)} held-out train images, "
            f"{len(encoder.boundaries) - 1} stages\n"
        )
        print(common.markdown_table(["method", "corruption", "severity", *common.SHIFT_HEADERS], shift_md))
        print(f"\n{common.SHIFT_RULE}.")
    print(f"\nWall time {wall / 60:.1f} min on {common.device_name(device)}.")
    if args.json:
        common.write_json(
            args.json,
            {
                "rows": out_rows,
                "shift": shift_rows,
                "meta": {
                    "encoder": encoder.identity(),
                    "n_fit": len(train),
                    "n_images": len(arr),
                    "epochs": args.epochs,
                    "n_blocks": args.n_blocks,
                    "t": args.t,
                    "seed": args.seed,
                    "device": common.device_name(device),
                    "wall_s": wall,
                    "git_commit": common.git_commit(),
                    "n_cal": 0 if x_cal is None else len(x_cal),
                    "mean_auroc": mean_auroc,
                    "clean_false_alarm_rate": false_alarms,
                    "fused_methods": fused,
                    "fusion": common.FUSION_NOTE,
                    "alpha": args.alpha,
                    "shift_rule": common.SHIFT_RULE,
                    "command": " ".join(sys.argv),
                },
            },
        )
    return 0
