"""`dlsr bench ood`: CIFAR-10 (ID) against every other set in the data folder, DLSR vs kNN vs Mahalanobis.

Protocol (docs/METHOD.md section 7): fit on CIFAR-10 train, calibrate on a held-out part of train (conformal
threshold at --alpha), evaluate CIFAR-10 test as ID against each OOD set's test.zip. Every method sees the same
cached encoder features. Each seed re-draws the fit/calibration split, the LFDN initialisation, the training
order and the scoring noise. Prints a markdown table (percentages, mean ± std over seeds) and images/s, and
for the --shift-methods the shift (dlsr.evidence) the per-stage p-values give each flagged image, per set.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.bench import common

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings

# The full run. t = 2 was chosen on the validation split (bench/validate.py: held-out CIFAR-10 classes and
# code-made corruptions of held-out train images as OOD), never on the test OOD sets; see
# bench/results/validation.md. Depth, width and epochs are what fits 2 CPU cores: at 4,000 fit images the
# validation proxy rose steeply from 5 to 20 epochs and slowly from 20 to 40 (bench/results/epochs_lite2.md); 20
# epochs on 45,000 images are 5.5x the training steps of that 40-epoch point; 8 blocks tied 16 (ablations). So the
# full run trains an 8-block LFDN of width D for 20 epochs (the paper: 16 blocks of width 2D for 150 epochs, a
# GPU job: pass --n-blocks 16 --width 1024 --epochs 150 for Lite0, whose D is 512).
DEFAULT_EPOCHS = 20
DEFAULT_BLOCKS = 8
DEFAULT_T = 2

# --quick: subsets and a shorter run (10 epochs), so the whole run, encoding from a cold cache included, stays
# within 15 minutes on 2 CPU cores.
QUICK = {"train_size": 4000, "cal_size": 1000, "id_size": 2000, "ood_size": 2000, "epochs": 10, "n_blocks": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small subsets and few epochs (< 15 min on 2 CPU cores): {QUICK}",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="CIFAR-10 train images used to fit (default all but --cal-size)",
    )
    p.add_argument(
        "--cal-size", type=int, default=None, help="held-out train images for calibration (default 5000)"
    )
    p.add_argument("--id-size", type=int, default=None, help="CIFAR-10 test images (default all 10000)")
    p.add_argument("--ood-size", type=int, default=None, help="images per OOD set (default all)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument(
        "--alpha", type=float, default=0.05, help="target false-alarm rate of the threshold (default 0.05)"
    )
    p.add_argument(
        "--methods", default=",".join(common.METHODS), help="comma-separated subset of the methods"
    )
    common.add_shift_argument(p)
    common.add_fusion_argument(p)
    common.add_dlsr_arguments(p, epochs=None, n_blocks=None, t=DEFAULT_T)


def _resolve_sizes(args: argparse.Namespace) -> None:
    quick = QUICK if args.quick else {}
    for key in ("train_size", "cal_size", "id_size", "ood_size"):
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key))
    if args.cal_size is None:
        args.cal_size = 5000
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else DEFAULT_EPOCHS
    if args.n_blocks is None:
        args.n_blocks = QUICK["n_blocks"] if args.quick else DEFAULT_BLOCKS


def measure_encoder(encoder, data_root, n: int, batch_size: int) -> float:
    """Encoder-alone images/s (preprocess + forward) on `n` CIFAR-10 test images, after one warm-up batch."""
    from dlsr.readers import decode_items, open_images

    images, _, _ = decode_items(open_images(data_root / common.ID_SET / "test.zip", limit=n, seed=123))
    encoder.encode(images[:batch_size], batch_size=batch_size)
    t0 = time.perf_counter()
    encoder.encode(images, batch_size=batch_size)
    return len(images) / (time.perf_counter() - t0)


def measure_head(det, x: np.ndarray, batch_size: int, **options: Any) -> float:
    """Scorer-head images/s on features (same batch size as the encoder), after a warm-up batch."""
    det.score(x[:batch_size], batch_size=batch_size, **options)
    t0 = time.perf_counter()
    det.score(x, batch_size=batch_size, **options)
    return len(x) / (time.perf_counter() - t0)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.calibration import conformal_threshold
    from dlsr.metrics import ood_metrics

    t_start = time.perf_counter()
    _resolve_sizes(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(common.METHODS))
    if unknown:
        print(
            f"dlsr bench ood: unknown method(s) {unknown}; choose from {list(common.METHODS)}",
            file=sys.stderr,
        )
        return 2
    fused = common.fused_methods(args, methods)
    bench = common.setup(args, settings)
    root, device, encoder = bench.root, bench.device, bench.encoder
    if args.width is None:
        args.width = encoder.dim  # width D: the paper's 2D costs 4x the compute for no gain at this scale
    ood_names = common.ood_set_names(root)
    print(
        f"dlsr bench ood: encoder {encoder.name} @{encoder.input_size} ({encoder.identity()['weights']['source']} "
        f"weights), OOD sets {ood_names}, device {device}",
        file=sys.stderr,
    )

    n_pool = None if args.train_size is None else args.train_size + args.cal_size
    load = bench.load
    pool = load(common.ID_SET, "train", n_pool)
    id_test = load(common.ID_SET, "test", args.id_size)
    ood = {name: load(name, "test", args.ood_size) for name in ood_names}
    t_features = time.perf_counter() - t_start

    # results[method][set] -> list over seeds of metric dicts; far[method] -> per-seed far-OOD averages
    all_methods = [*methods, *fused]
    results: dict[str, dict[str, list[dict[str, float]]]] = {m: {s: [] for s in ood_names} for m in all_methods}
    far_alarm: dict[str, list[float]] = {m: [] for m in all_methods}
    speed: dict[str, float] = {}
    fit_seconds: list[float] = []
    dlsr_methods = [m for m in methods if m in common.DLSR_SCORES]
    shift_methods = common.shift_methods(args, methods)
    need_stages = set(shift_methods) | common.stage_methods(fused)
    id_label = f"{common.ID_SET} test (ID)"
    shift_sets = [id_label, *ood_names]
    # shift[method][set] -> per-seed counts of flagged images and their shifts
    shift: dict[str, dict[str, list[dict[str, int]]]] = {m: {s: [] for s in shift_sets} for m in shift_methods}
    for seed in range(args.seeds):
        cal_idx, fit_idx = common.split_indices(len(pool.features), args.cal_size, seed)
        x_fit, x_cal = pool.features[fit_idx], pool.features[cal_idx]
        print(f"seed {seed}: fit on {len(x_fit)}, calibrate on {len(x_cal)}", file=sys.stderr, flush=True)
        scores: dict[str, dict[str, np.ndarray]] = {}  # method -> split -> scores
        stages: dict[str, dict[str, np.ndarray]] = {}  # method -> split -> (N, S) per-stage scores
        if dlsr_methods:
            det = common.make_dlsr(args, encoder.boundaries, seed, device)
            t0 = time.perf_counter()
            det.fit(x_fit)
            fit_seconds.append(time.perf_counter() - t0)
            names = tuple(common.DLSR_SCORES[m] for m in dlsr_methods)
            parts = {"cal": x_cal, "id": id_test.features} | {k: v.features for k, v in ood.items()}
            with_stages = any(m in need_stages for m in dlsr_methods)
            per_split = {k: det.score_all(v, scores=names, stages=with_stages) for k, v in parts.items()}
            for m in dlsr_methods:
                scores[m] = {k: v[common.DLSR_SCORES[m]] for k, v in per_split.items()}
                if m in need_stages:
                    stages[m] = {k: v[common.DLSR_SCORES[m] + ":stages"] for k, v in per_split.items()}
                if seed == 0:
                    speed[m] = measure_head(
                        det, id_test.features[:2048], args.batch_size, score=common.DLSR_SCORES[m]
                    )
        for m, det in common.make_baselines(args, device, encoder.boundaries).items():
            if m not in methods:
                continue
            det.fit(x_fit)
            scores[m] = {"cal": det.score(x_cal), "id": det.score(id_test.features)}
            scores[m] |= {k: det.score(v.features) for k, v in ood.items()}
            if m in need_stages:
                stages[m] = {"cal": det.score_stages(x_cal), "id": det.score_stages(id_test.features)}
                stages[m] |= {k: det.score_stages(v.features) for k, v in ood.items()}
            if seed == 0:
                speed[m] = measure_head(det, id_test.features[:2048], args.batch_size)
        mains = {f"{m}:main": {k: v[:, None] for k, v in scores[m].items()} for m in methods}
        scores |= common.fused_scores(fused, stages | mains, seed)
        for m in all_methods:
            s = scores[m]
            thr = conformal_threshold(s["cal"], args.alpha)
            far_alarm[m].append(float(np.mean(s["id"] > thr)))
            for name in ood_names:
                results[m][name].append(ood_metrics(s["id"], s[name]))
        for m in shift_methods:
            s, st = scores[m], stages[m]
            for label, split in zip(shift_sets, ["id", *ood_names], strict=True):
                shift[m][label].append(common.shift_counts(s["cal"], st["cal"], s[split], st[split], args.alpha))

    t0 = time.perf_counter()
    enc_speed = measure_encoder(
        encoder, root, n=min(512, max(args.batch_size * 2, 256)), batch_size=args.batch_size
    )
    t_speed = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    dev_name = common.device_name(device)
    far_sets = [s for s in ood_names if s not in common.NEAR_OOD]
    near_sets = [s for s in ood_names if s in common.NEAR_OOD]

    rows_md, rows_json = [], []
    keys = ("auroc", "fpr95", "aupr_in", "aupr_out")

    def add(method: str, label: str, per_seed: list[dict[str, float]]) -> None:
        vals = {k: [r[k] for r in per_seed] for k in keys}
        rows_md.append([method, label] + [common.pm(vals[k]) for k in keys])
        row = {"method": method, "ood_set": label}
        row |= {k: float(np.mean(vals[k])) for k in keys}
        row |= {f"{k}_std": float(np.std(vals[k])) for k in keys}
        rows_json.append(row)

    for m in all_methods:
        for name in ood_names:
            add(m, name + (" (near)" if name in common.NEAR_OOD else ""), results[m][name])
        if far_sets:
            per_seed = [
                {k: float(np.mean([results[m][s][i][k] for s in far_sets])) for k in keys}
                for i in range(args.seeds)
            ]
            add(m, "far-OOD average", per_seed)
    for r in rows_json:
        r["ood_set"] = r["ood_set"].replace(" (near)", "")

    table = common.markdown_table(
        ["method", "OOD set", "AUROC %", "FPR95 %", "AUPR-in %", "AUPR-out %"], rows_md
    )
    speed_rows = []
    for m in all_methods:
        head = speed.get(m, float("nan"))
        e2e = 1.0 / (1.0 / enc_speed + 1.0 / head)
        # A fused method costs its sources' heads (one pass each with stages) plus the fusion (microseconds).
        speed_rows.append(
            [
                m,
                f"{head:,.0f}" if m in speed else "-",
                f"{e2e:,.1f}" if m in speed else "-",
                f"{100 * e2e / enc_speed:.0f}%" if m in speed else "-",
                f"{100 * np.mean(far_alarm[m]):.2f}",
            ]
        )
    speed_table = common.markdown_table(
        [
            "scorer",
            "head images/s (features)",
            "end-to-end images/s",
            "of encoder alone",
            f"ID-test false alarms % at alpha={args.alpha}",
        ],
        speed_rows,
    )
    dlsr_desc = (
        f"LFDN {args.n_blocks} blocks, width {args.width or '2D'}, {args.epochs} epochs, t={args.t}, "
        f"ddim_steps={args.ddim_steps or args.t}, draws={args.n_draws}"
    )
    print(
        f"\n### CIFAR-10 (ID) vs OOD: {encoder.name} @{encoder.input_size}, {dlsr_desc}; "
        f"fit {len(pool.features) - args.cal_size}, calibrate {args.cal_size}, ID test {len(id_test.features)}, "
        f"{args.seeds} seeds (mean ± std)\n"
    )
    print(table)
    print(
        f"\nThroughput at batch {args.batch_size} on {dev_name}: encoder alone {enc_speed:,.1f} images/s "
        f"(preprocess + forward)\n"
    )
    print(speed_table)
    if fused:
        print(f"\n### Fused vs single scores: AUROC %, mean over {args.seeds} seed(s)\n")
        print(common.markdown_table(*common.fusion_comparison(rows_json, methods, fused)))
        print(f"\n{common.FUSION_NOTE}.")
    near_txt = f"; near-OOD: {', '.join(near_sets)}" if near_sets else ""
    shift_md, shift_rows = [], []
    for m in shift_methods:
        for label in shift_sets:
            pooled = common.pool_counts(shift[m][label])
            shift_md.append([m, label, *common.shift_cells(pooled)])
            shift_rows.append({"method": m, "set": label.removesuffix(" test (ID)"), **common.shift_json(pooled)})
    if shift_methods:
        print(
            f"\n### Shift among flagged images: alpha={args.alpha}, {len(encoder.boundaries) - 1} stages, "
            f"counts pooled over {args.seeds} seed(s)\n"
        )
        print(common.markdown_table(["method", "set", *common.SHIFT_HEADERS], shift_md))
        print(f"\n{common.SHIFT_RULE}.")
    print(
        f"\nfar-OOD: {', '.join(far_sets)}{near_txt}. Wall time {wall / 60:.1f} min "
        f"(features {t_features / 60:.1f} min, LFDN fit {np.sum(fit_seconds) / 60:.1f} min, speed {t_speed:.0f} s)."
    )

    if args.json:
        meta = {
            "command": "dlsr " + " ".join(sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("dlsr")
            else " ".join(sys.argv),
            "git_commit": common.git_commit(),
            "device": dev_name,
            "encoder": encoder.identity(),
            "ood_sets": ood_names,
            "far_ood_sets": far_sets,
            "near_ood_sets": near_sets,
            "n_fit": len(pool.features) - args.cal_size,
            "n_cal": args.cal_size,
            "n_id_test": len(id_test.features),
            "n_ood": {k: len(v.features) for k, v in ood.items()},
            "seeds": args.seeds,
            "alpha": args.alpha,
            "id_test_false_alarm_rate": {m: float(np.mean(v)) for m, v in far_alarm.items()},
            "dlsr": {
                k: getattr(args, k)
                for k in (
                    "epochs",
                    "n_blocks",
                    "width",
                    "t",
                    "ddim_steps",
                    "n_draws",
                    "lr",
                    "train_batch",
                    "ema_decay",
                    "weight_decay",
                )
            },
            "knn_k": args.knn_k,
            "mahalanobis_shrinkage": args.shrinkage,
            "images_per_s": {
                "batch_size": args.batch_size,
                "encoder": enc_speed,
                "heads": speed,
                "end_to_end": {m: 1.0 / (1.0 / enc_speed + 1.0 / v) for m, v in speed.items()},
            },
            "wall_s": wall,
            "quick": bool(args.quick),
        }
        meta["shift_rule"] = common.SHIFT_RULE
        meta["fused_methods"] = fused
        meta["fusion"] = common.FUSION_NOTE
        common.write_json(args.json, {"rows": rows_json, "shift": shift_rows, "meta": meta})
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0
