"""Refit timing on this machine: `python -m dlsr_monitor.trainer.bench_refit --n 5000 [--fit-only-n 50000]`.

Measures the parts of a trainer job separately and prints JSON: cold feature extraction (empty cache), cached
feature read, a cold fit, a warm-started refit, and scoring the calibration + held-out splits. With
`--fit-only-n`, also times fit / refit on that many synthetic feature rows of the encoder's width (training cost
does not depend on the values), so a 50k refit can be estimated without encoding 50k images cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _fit_times(dim: int, n: int, boundaries, args) -> dict:
    import torch

    from dlsr.detector import DLSRDetector

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    det = DLSRDetector(
        n_blocks=args.n_blocks, epochs=args.epochs, boundaries=boundaries, device="cpu", progress=False
    )
    t = time.perf_counter()
    det.fit(x, progress=False)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    det.fit(x, progress=False, warm_start=True, epochs=args.refit_epochs)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    det.score(x[: int(0.3 * n)])
    score = time.perf_counter() - t
    return {
        "n_fit": n,
        "fit_cold_s": round(cold, 2),
        "refit_warm_s": round(warm, 2),
        "score_30pct_s": round(score, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/train.zip")
    )
    ap.add_argument(
        "--n", type=int, default=5000, help="Vetted images encoded cold, then read from the cache"
    )
    ap.add_argument(
        "--fit-only-n", type=int, default=0, help="Also time fit/refit on this many synthetic rows"
    )
    ap.add_argument("--input-size", type=int, default=None, help="Encoder input size (default: backbone's)")
    ap.add_argument("--n-blocks", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10, help="Epochs of the cold fit")
    ap.add_argument("--refit-epochs", type=int, default=3, help="Epochs of the warm-started refit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--estimate", type=int, nargs="*", default=[5000, 50000], help="Job sizes to extrapolate to"
    )
    args = ap.parse_args()

    from dlsr.cache import FeatureCache
    from dlsr.encoder import Encoder
    from dlsr.readers import open_images

    enc = Encoder.create(input_size=args.input_size, device="cpu")
    out: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
        "encoder": enc.name,
        "input_size": enc.input_size,
        "dim": enc.dim,
        "n_blocks": args.n_blocks,
        "epochs": args.epochs,
        "refit_epochs": args.refit_epochs,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        images = open_images(args.data, limit=args.n)
        t = time.perf_counter()
        feats = cache.features(enc, images, batch_size=args.batch_size, progress=True)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        cache.features(enc, open_images(args.data, limit=args.n), batch_size=args.batch_size, progress=False)
        cached = time.perf_counter() - t
    out.update(
        {
            "n_images": int(feats.shape[0]),
            "encode_cold_s": round(cold, 2),
            "encode_img_per_s": round(feats.shape[0] / cold, 1),
            "cache_read_s": round(cached, 2),
        }
    )
    out["fit"] = [_fit_times(enc.dim, int(0.7 * args.n), enc.boundaries, args)]
    if args.fit_only_n:
        out["fit"].append(_fit_times(enc.dim, int(0.7 * args.fit_only_n), enc.boundaries, args))
    # Extrapolation (linear in images and epochs) from the measured rates: a job encodes the new images (cold)
    # or reads them (cached), refits on 70% for `refit_epochs`, scores the other 30% (calibration + held-out).
    f = out["fit"][0]
    enc_rate = out["n_images"] / out["encode_cold_s"]
    read_rate = out["n_images"] / max(out["cache_read_s"], 1e-3)
    refit_rate = f["n_fit"] * args.refit_epochs / max(f["refit_warm_s"], 1e-3)  # sample-steps/s
    score_rate = int(0.3 * args.n) / max(f["score_30pct_s"], 1e-3)
    est = {}
    for n in args.estimate:
        train = 0.7 * n * args.refit_epochs / refit_rate
        score = 0.3 * n / score_rate
        est[str(n)] = {
            "refit_cold_features_s": round(n / enc_rate + train + score),
            "refit_cached_features_s": round(n / read_rate + train + score),
        }
    out["estimate"] = est
    out["rates"] = {
        "encode_img_s": round(enc_rate, 1),
        "cache_read_img_s": round(read_rate, 1),
        "refit_sample_steps_s": round(refit_rate, 1),
        "score_img_s": round(score_rate, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
