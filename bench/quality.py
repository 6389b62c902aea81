"""`dlsr bench quality`: AUROC per OOD set and false alarms per encoder runtime and precision, one split for all.

Every configuration (`runtime[:precision]`, as in `dlsr bench speed --runtimes`) encodes the same images through
the feature cache (keyed per runtime and precision, so a rerun encodes nothing): a CIFAR-10 train pool cut once
into fit and conformal-calibration parts, CIFAR-10 test as ID and each OOD set's test images. int8 configurations
are quantized with `--quant-size` images drawn from the fit part (the same images for every int8 row). Each
configuration then fits its own detectors on its own features, as a deployment in that runtime would (same seed,
same hyperparameters), and is compared with torch fp32: AUROC per set, the false-alarm rate on ID test at the
conformal threshold (alpha), the mean and max |z - z_torch| of the ID test features and the Spearman rank
correlation of the ID test scores with torch fp32's.
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

DEFAULT_RUNTIMES = "torch,onnxruntime,openvino,openvino:bf16,onnxruntime:int8,openvino:int8"
METHODS = ("DLSR-MFsim4", "Mahalanobis")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument(
        "--runtimes",
        default=DEFAULT_RUNTIMES,
        help=f"configurations runtime[:precision],... (default {DEFAULT_RUNTIMES}; torch fp32, the reference, is "
        "always added; bf16 rows are dropped on a CPU without native bf16 unless named with --keep-emulated-bf16)",
    )
    p.add_argument("--keep-emulated-bf16", action="store_true", help="run bf16 rows on a CPU without native bf16")
    p.add_argument("--train-size", type=int, default=4000, help="CIFAR-10 train images fitted on (default 4000)")
    p.add_argument("--cal-size", type=int, default=1000, help="train images for the conformal threshold (1000)")
    p.add_argument("--quant-size", type=int, default=1000, help="fit images that calibrate int8 (default 1000)")
    p.add_argument("--id-size", type=int, default=1000, help="CIFAR-10 test images (default 1000)")
    p.add_argument("--ood-size", type=int, default=1000, help="images per OOD set (default 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="target false-alarm rate (default 0.05)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(common.METHODS)}")
    common.add_dlsr_arguments(p, epochs=10, n_blocks=8, t=2)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Continuous scores: no ties, so the Pearson correlation of the ranks is Spearman's rho.
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def _calibration_images(path, limit: int, names: list[str]) -> list:
    """The PIL images named `names` (in that order) from the zip the pool was read from."""
    from dlsr.images import decode_image
    from dlsr.readers import open_images

    wanted = set(names)
    by_name = {it.name: decode_image(it.data) for it in open_images(path, limit=limit, seed=0) if it.name in wanted}
    return [by_name[n] for n in names]


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.cache import FeatureCache
    from dlsr.calibration import conformal_threshold
    from dlsr.encoder import cpu_has_bf16
    from dlsr.metrics import ood_metrics
    from dlsr_monitor.bench.speed_runtimes import Config, parse_configs

    t_start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(common.METHODS))
    if unknown:
        print(f"dlsr bench quality: unknown method(s) {unknown}; choose from {list(common.METHODS)}", file=sys.stderr)
        return 2
    configs = parse_configs(args.runtimes)
    if Config("torch", "fp32") not in configs:
        configs.insert(0, Config("torch", "fp32"))
    native_bf16 = cpu_has_bf16()
    if not native_bf16 and not args.keep_emulated_bf16:
        dropped = [c.label for c in configs if c.precision == "bf16"]
        configs = [c for c in configs if c.precision != "bf16"]
        if dropped:
            print(f"dlsr bench quality: no native bf16 on this CPU: dropped {dropped}", file=sys.stderr)
    root = common.data_dir(args)
    cache = FeatureCache(common.cache_dir(args, settings))
    ood_names = common.ood_set_names(root)
    pool_path = root / common.ID_SET / "train.zip"
    n_pool = args.train_size + args.cal_size

    def load(enc: Any, dataset: str, split: str, limit: int) -> common.Split:
        return common.load_split(
            cache, enc, root / dataset / f"{split}.zip", limit=limit, seed=0, batch_size=args.batch_size,
            label=f"{enc.runtime_name} {enc.precision} {dataset}/{split}",
        )

    # The split, fixed by the reference encoder's pool (every runtime reads the same images in the same order).
    ref_enc = common.make_encoder(args, settings, runtime="torch", precision="fp32")
    if args.width is None:
        args.width = ref_enc.dim  # width D, as `bench ood`: the paper's 2D costs 4x the compute on 2 cores
    ref_pool = load(ref_enc, common.ID_SET, "train", n_pool)
    cal_idx, fit_idx = common.split_indices(len(ref_pool.features), args.cal_size, 0)
    quant_idx = np.random.default_rng(1).permutation(fit_idx)[: args.quant_size]
    quant_names = [ref_pool.names[i] for i in quant_idx]
    quant_images: list | None = None

    rows: list[dict[str, Any]] = []
    ref: dict[str, Any] = {}
    for c in configs:
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if c.precision == "int8":
            if quant_images is None:
                quant_images = _calibration_images(pool_path, n_pool, quant_names)
            extra["calibration"] = quant_images
        enc = ref_enc if c == Config("torch", "fp32") else common.make_encoder(
            args, settings, runtime=c.runtime, precision=c.precision, threads=c.threads, **extra
        )
        t_ready = time.perf_counter() - t0
        pool = load(enc, common.ID_SET, "train", n_pool)
        if pool.names != ref_pool.names:
            raise SystemExit(f"dlsr bench quality: {c.label} decoded another set of train images than torch")
        id_test = load(enc, common.ID_SET, "test", args.id_size)
        ood = {name: load(enc, name, "test", args.ood_size) for name in ood_names}
        t_feat = time.perf_counter() - t0
        x_fit, x_cal = pool.features[fit_idx], pool.features[cal_idx]
        scores: dict[str, dict[str, np.ndarray]] = {}
        if "DLSR-MFsim4" in methods or any(m in common.DLSR_SCORES for m in methods):
            det = common.make_dlsr(args, enc.boundaries, 0, "cpu")
            det.fit(x_fit)
            names = tuple(common.DLSR_SCORES[m] for m in methods if m in common.DLSR_SCORES)
            parts = {"cal": x_cal, "id": id_test.features} | {k: v.features for k, v in ood.items()}
            per_split = {k: det.score_all(v, scores=names) for k, v in parts.items()}
            for m in methods:
                if m in common.DLSR_SCORES:
                    scores[m] = {k: v[common.DLSR_SCORES[m]] for k, v in per_split.items()}
        for m, base in common.make_baselines(args, "cpu", enc.boundaries).items():
            if m in methods:
                base.fit(x_fit)
                scores[m] = {"cal": base.score(x_cal), "id": base.score(id_test.features)}
                scores[m] |= {k: base.score(v.features) for k, v in ood.items()}
        if c == Config("torch", "fp32"):
            ref = {"id": id_test.features, "scores": scores}
        dz = np.abs(id_test.features - ref["id"])
        for m in methods:
            s = scores[m]
            thr = conformal_threshold(s["cal"], args.alpha)
            row = {
                "runtime": c.runtime,
                "precision": c.precision,
                "method": m,
                "auroc": {name: ood_metrics(s["id"], s[name])["auroc"] for name in ood_names},
                "false_alarm_rate": float(np.mean(s["id"] > thr)),
                "spearman_vs_torch_fp32": _spearman(s["id"], ref["scores"][m]["id"]),
                "feature_abs_error": {"mean": float(dz.mean()), "max": float(dz.max())},
                "seconds": {"ready": t_ready, "features": t_feat, "total": time.perf_counter() - t0},
            }
            rows.append(row)
        print(f"  {c.label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    base = {r["method"]: r for r in rows if (r["runtime"], r["precision"]) == ("torch", "fp32")}
    table = []
    for r in rows:
        b = base[r["method"]]
        cells = [f"{r['runtime']} {r['precision']}", r["method"]]
        for name in ood_names:
            a, d = 100 * r["auroc"][name], 100 * (r["auroc"][name] - b["auroc"][name])
            cells.append(f"{a:.2f} ({d:+.2f})")
        far, dfar = 100 * r["false_alarm_rate"], 100 * (r["false_alarm_rate"] - b["false_alarm_rate"])
        cells += [
            f"{far:.1f} ({dfar:+.1f})",
            f"{r['spearman_vs_torch_fp32']:.4f}",
            f"{r['feature_abs_error']['mean']:.1e} / {r['feature_abs_error']['max']:.1e}",
        ]
        table.append(cells)
    n_fit = len(fit_idx)
    sigma = 100 * np.sqrt(args.alpha * (1 - args.alpha) * (1 / args.id_size + 1 / args.cal_size))
    wall = time.perf_counter() - t_start
    print(
        f"\n### Quality per encoder runtime: {ref_enc.name} @{ref_enc.input_size}; fit {n_fit}, calibrate "
        f"{args.cal_size} (alpha {args.alpha}), int8 calibrated on {args.quant_size} fit images, ID test "
        f"{args.id_size}, {args.ood_size} per OOD set; LFDN {args.n_blocks} blocks, width {args.width or '2D'}, "
        f"{args.epochs} epochs, t={args.t}, seed 0; {common.device_name('cpu')}, native bf16: "
        f"{'yes' if native_bf16 else 'no'}\n"
    )
    print(common.markdown_table(
        ["runtime", "method", *[f"AUROC % {n} (vs torch fp32)" for n in ood_names],
         f"ID false alarms % at alpha {args.alpha} (vs torch fp32)", "Spearman of ID scores vs torch fp32",
         "ID features mean / max abs error vs torch fp32"],
        table,
    ))
    print(
        f"\nSampling error of a false-alarm rate here: sigma = {sigma:.1f} points (binomial, test + calibration). "
        f"Wall time {wall / 60:.1f} min."
    )
    if args.json:
        common.write_json(args.json, {
            "rows": rows,
            "meta": {
                "command": " ".join(sys.argv),
                "git_commit": common.git_commit(),
                "cpu": common.device_name("cpu"),
                "native_bf16": native_bf16,
                "encoder": ref_enc.identity(),
                "ood_sets": ood_names,
                "n_fit": n_fit,
                "n_cal": args.cal_size,
                "n_quant": args.quant_size,
                "n_id_test": args.id_size,
                "n_ood": args.ood_size,
                "alpha": args.alpha,
                "false_alarm_sigma": sigma / 100,
                "dlsr": {k: getattr(args, k) for k in ("epochs", "n_blocks", "width", "t", "train_batch")},
                "wall_s": wall,
            },
        })
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0
