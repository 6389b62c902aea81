"""`dlsr bench calibration`: the false-alarm rate one calibration set realises, marginal vs pac thresholds.

Protocol: fit the product's detector (`model.detector`, `model.score`; a short LFDN training as in `bench ood`)
on CIFAR-10 train features, score a pool of CIFAR-10 test images once, then for each calibration size n and
alpha draw `--draws` random calibration sets of n pool scores; the rest of the pool (disjoint) is the fresh ID
data. Per draw and method the threshold comes from `dlsr.calibration.conformal_threshold` and the realised
false-alarm rate is the share of fresh scores above it. Prints the mean, 90th and 99th percentile of that rate
per (method, n, alpha), and whether pac keeps the 90th percentile within alpha (its guarantee at delta 0.1: at
most a delta share of calibration sets exceed alpha). Both methods see the same draws.

Next to the measured figures it prints the exact law of the realised rate, Beta(n - k + 1, k): its 90th
percentile and P(FA > alpha). The measured ones differ from it by Monte Carlo error (200 draws: the 90th
percentile moves by about a tenth of a percentage point at n = 500) and by the binomial noise of a finite fresh
set; where the exact P(FA > alpha) is close to delta (n = 500, alpha = 0.05: 8.6 %) the measured 90th
percentile can land either side of alpha.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.bench import common

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings

METHODS = ("marginal", "pac")
# The full run: 4,000 fit images (the `bench ood --quick` size), the whole CIFAR-10 test set as the pool,
# a short LFDN training (the threshold's statistics do not depend on how good the model is, only on the scores
# being exchangeable).
DEFAULTS = {"fit_size": 4000, "pool_size": None, "draws": 200, "ns": "200,500,2000", "alphas": "0.01,0.05"}
# --quick: what a test runs in seconds on a tiny backbone.
QUICK = {"fit_size": 300, "pool_size": 600, "draws": 20, "ns": "100,250", "alphas": "0.05", "epochs": 1,
         "n_blocks": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    p.add_argument("--fit-size", type=int, default=None, help=f"CIFAR-10 train images fitted on (default "
                   f"{DEFAULTS['fit_size']})")
    p.add_argument("--pool-size", type=int, default=None, help="CIFAR-10 test images scored once: the pool the "
                   "calibration and fresh sets are drawn from (default all 10,000)")
    p.add_argument("--draws", type=int, default=None, help=f"calibration draws per (n, alpha) (default "
                   f"{DEFAULTS['draws']})")
    p.add_argument("--ns", default=None, help=f"calibration sizes, comma-separated (default {DEFAULTS['ns']})")
    p.add_argument("--alphas", default=None, help=f"target rates, comma-separated (default {DEFAULTS['alphas']})")
    p.add_argument("--delta", type=float, default=0.1, help="pac: allowed share of calibration sets above alpha "
                   "(default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fit and the draws (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="LFDN training epochs (default 10, --quick 1)")
    p.add_argument("--n-blocks", type=int, default=None, help="LFDN blocks (default 8, --quick 1)")


def _resolve(args: argparse.Namespace) -> None:
    base = QUICK if args.quick else DEFAULTS
    for key in ("fit_size", "pool_size", "draws", "ns", "alphas"):
        if getattr(args, key) is None:
            setattr(args, key, base.get(key))
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else 10
    if args.n_blocks is None:
        args.n_blocks = QUICK["n_blocks"] if args.quick else 8
    args.ns = [int(v) for v in str(args.ns).split(",") if v.strip()]
    args.alphas = [float(v) for v in str(args.alphas).split(",") if v.strip()]


def make_detector(args: argparse.Namespace, settings: Settings | None, encoder: Any, device: str):
    """The product's detector kind and score from the settings, trained briefly (--epochs, --n-blocks)."""
    from dlsr.base import detector_class
    from dlsr.detector import DLSRDetector

    model = getattr(settings, "model", None)
    kind = getattr(model, "detector", "dlsr")
    if kind == "dlsr":
        kw = model.detector_kwargs(device=device, dim=encoder.dim) if model is not None else {}
        kw.update(epochs=args.epochs, n_blocks=args.n_blocks, width=encoder.dim, seed=args.seed, progress=True)
        return DLSRDetector(device=device, boundaries=encoder.boundaries, **kw)
    return detector_class(kind)(device=device, boundaries=encoder.boundaries, progress=False)


def realised_rates(
    scores: np.ndarray, n: int, alpha: float, *, draws: int, delta: float, seed: int
) -> dict[str, np.ndarray]:
    """Per method, the false-alarm rate each of `draws` random calibration sets of n scores realises on the rest
    of the pool (the same draws for every method)."""
    from dlsr.calibration import conformal_threshold

    rng = np.random.default_rng(seed)
    out = {m: np.empty(draws) for m in METHODS}
    for d in range(draws):
        perm = rng.permutation(scores.size)
        cal, fresh = scores[perm[:n]], scores[perm[n:]]
        for m in METHODS:
            with warnings.catch_warnings():  # too few scores for pac: +inf, said once in the summary instead
                warnings.simplefilter("ignore")
                t = conformal_threshold(cal, alpha, method=m, delta=delta)
            out[m][d] = float(np.mean(fresh > t))
    return out


def exact_law(n: int, k: int, alpha: float) -> tuple[float, float]:
    """(90th percentile, P(FA > alpha)) of the realised rate Beta(n - k + 1, k) of the k-th of n scores on an
    infinite fresh set; (0, 0) for k > n (a +inf threshold)."""
    from scipy.special import bdtr

    from dlsr.calibration import false_alarm_bound

    if k > n:
        return 0.0, 0.0
    return false_alarm_bound(n, k, 0.1), float(bdtr(n - k, n, alpha))


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.calibration import calibration_rank, min_calibration_size

    t_start = time.perf_counter()
    _resolve(args)
    bench = common.setup(args, settings)
    encoder, device = bench.encoder, bench.device
    fit = bench.load(common.ID_SET, "train", args.fit_size)
    pool = bench.load(common.ID_SET, "test", args.pool_size)
    too_big = [n for n in args.ns if n >= len(pool.features)]
    if too_big:
        print(f"dlsr bench calibration: n {too_big} leaves no fresh images in a pool of {len(pool.features)}; "
              "lower --ns or raise --pool-size", file=sys.stderr)
        return 2
    det = make_detector(args, settings, encoder, device)
    t0 = time.perf_counter()
    det.fit(fit.features)
    fit_s = time.perf_counter() - t0
    scores = np.asarray(det.score(pool.features), dtype=np.float64)
    scores = scores[np.isfinite(scores)]

    rows: list[dict[str, Any]] = []
    for alpha in args.alphas:
        for n in args.ns:
            rates = realised_rates(scores, n, alpha, draws=args.draws, delta=args.delta, seed=args.seed)
            for m in METHODS:
                fa = rates[m]
                k = calibration_rank(n, alpha, method=m, delta=args.delta)
                beta_p90, beta_above = exact_law(n, k, alpha)
                rows.append({
                    "method": m, "n": n, "alpha": alpha, "delta": args.delta if m == "pac" else None,
                    "fa_mean": float(fa.mean()), "fa_p90": float(np.quantile(fa, 0.9)),
                    "fa_p99": float(np.quantile(fa, 0.99)),
                    "rank": k, "share_above_alpha": float(np.mean(fa > alpha)),
                    "beta_p90": beta_p90, "beta_above_alpha": beta_above,
                })
    pac_ok = all(r["fa_p90"] <= r["alpha"] for r in rows if r["method"] == "pac")
    pac_exact_ok = all(r["beta_above_alpha"] <= args.delta for r in rows if r["method"] == "pac")
    needed = {str(a): min_calibration_size(a, method="pac", delta=args.delta) for a in args.alphas}
    meta = {
        "detector": det.kind,
        "score": getattr(getattr(det, "config", None), "score", None),
        "encoder": f"{encoder.name} @{encoder.input_size}",
        "device": common.device_name(device),
        "fit_images": int(len(fit.features)),
        "pool_images": int(scores.size),
        "draws": args.draws,
        "delta": args.delta,
        "epochs": args.epochs,
        "n_blocks": args.n_blocks,
        "seed": args.seed,
        "pac_min_calibration": needed,
        "pac_p90_within_alpha": pac_ok,
        "pac_exact_within_delta": pac_exact_ok,
        # Per row: the rank, the share of draws above alpha, and the exact law's 90th percentile and P(FA > alpha).
        "detail": [{k: r[k] for k in ("method", "n", "alpha", "rank", "share_above_alpha", "beta_p90",
                                      "beta_above_alpha")} for r in rows],
        "fit_s": round(fit_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "commit": common.git_commit(),
    }
    print(f"## dlsr bench calibration: realised false-alarm rate over {args.draws} calibration draws\n")
    print(f"{meta['detector']} ({meta['score'] or 'its score'}) on {meta['encoder']}, fitted on "
          f"{meta['fit_images']} CIFAR-10 train images; pool of {meta['pool_images']} CIFAR-10 test scores; fresh "
          f"ID = the pool minus the calibration set; {meta['device']}\n")
    headers = ["method", "n", "alpha", "delta", "rank k", "FA mean %", "FA p90 %", "FA p99 %", "draws > alpha %",
               "p90 <= alpha", "exact p90 %", "exact P(FA > alpha) %"]
    table = [
        [r["method"], r["n"], r["alpha"], r["delta"] if r["delta"] is not None else "-", r["rank"],
         f"{100 * r['fa_mean']:.2f}", f"{100 * r['fa_p90']:.2f}", f"{100 * r['fa_p99']:.2f}",
         f"{100 * r['share_above_alpha']:.1f}", "yes" if r["fa_p90"] <= r["alpha"] else "no",
         f"{100 * r['beta_p90']:.2f}", f"{100 * r['beta_above_alpha']:.1f}"]
        for r in rows
    ]
    print(common.markdown_table(headers, table))
    print()
    for a, need in needed.items():
        small = [n for n in args.ns if n < need]
        if small:
            print(f"- alpha {a}: pac needs at least {need} calibration scores at delta {args.delta}; n = {small} "
                  "gets a +inf threshold (nothing flagged: FA 0)")
    print(f"- pac keeps the 90th percentile within alpha at delta {args.delta}: {'yes' if pac_ok else 'NO'} "
          f"(measured over {args.draws} draws); exact law (Beta(n - k + 1, k)): "
          f"{'yes' if pac_exact_ok else 'NO'} in every row")
    for r in rows:
        if r["method"] == "pac" and r["fa_p90"] > r["alpha"] >= r["beta_p90"]:
            print(f"  n = {r['n']}, alpha {r['alpha']}: measured p90 {100 * r['fa_p90']:.2f} % vs exact "
                  f"{100 * r['beta_p90']:.2f} %; {100 * r['share_above_alpha']:.1f} % of draws above alpha where "
                  f"{100 * r['beta_above_alpha']:.1f} % are expected: Monte Carlo and finite-fresh-set noise")
    print(f"\n{meta['wall_s']:.0f} s in all (fit {meta['fit_s']:.0f} s), commit {meta['commit']}")
    if args.json:
        keys = ("method", "n", "alpha", "delta", "fa_mean", "fa_p90", "fa_p99")
        common.write_json(args.json, {"rows": [{k: r[k] for k in keys} for r in rows], "meta": meta})
    return 0
