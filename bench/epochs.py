"""`dlsr bench epochs`: how AUROC moves with LFDN training epochs, to choose the full run's budget.

For each epoch count two models are trained (one seed): one on the validation fit split (CIFAR-10 train without
the held-out classes, as `bench validate`), scored on held-out ID vs the held-out classes (the near-OOD proxy the
choice is made on); one on the `bench ood` fit split, scored on CIFAR-10 test vs each OOD set (shown, not used
to choose). Baseline rows give the bar on the same features.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from dlsr_monitor.bench import common
from dlsr_monitor.bench.ood import DEFAULT_BLOCKS, DEFAULT_T

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings

SCORES = ("mse", "mfsim5", "mfsim4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument("--epochs-list", default="5,10,20,40", help="epoch counts to train (default 5,10,20,40)")
    p.add_argument("--pool-size", type=int, default=5000, help="CIFAR-10 train images used (default 5000)")
    p.add_argument("--cal-size", type=int, default=1000, help="pool images left out of the test-side fit")
    p.add_argument("--holdout", default="cat,truck", help="classes held out as near-OOD proxy (default cat,truck)")
    p.add_argument("--val-size", type=int, default=600, help="held-out ID validation images (default 600)")
    p.add_argument("--id-size", type=int, default=2000, help="CIFAR-10 test images (default 2000)")
    p.add_argument("--ood-size", type=int, default=2000, help="images per OOD set (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    common.add_dlsr_arguments(p, epochs=None, n_blocks=DEFAULT_BLOCKS, t=DEFAULT_T)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.metrics import auroc

    t_start = time.perf_counter()
    epochs_list = [int(v) for v in args.epochs_list.split(",") if v.strip()]
    bench = common.setup(args, settings)
    root, device, encoder = bench.root, bench.device, bench.encoder
    if args.width is None:
        args.width = encoder.dim
    load = bench.load
    ood_names = common.ood_set_names(root)
    pool = load(common.ID_SET, "train", args.pool_size)
    id_test = load(common.ID_SET, "test", args.id_size)
    ood = {name: load(name, "test", args.ood_size).features for name in ood_names}

    fit_v, val_idx, is_held, held = common.holdout_split(pool.names, args.holdout, args.val_size, args.seed)
    val_fit = pool.features[fit_v]
    val_parts = {"id": pool.features[val_idx], "held-out classes": pool.features[is_held]}
    _, fit_idx = common.split_indices(len(pool.features), args.cal_size, args.seed)
    test_fit = pool.features[fit_idx]
    test_parts = {"id": id_test.features} | ood
    cols = ["held-out classes"] + ood_names

    def aurocs(sv: dict, st: dict) -> list[float]:
        # Validation (ID val vs held-out classes) first, then CIFAR-10 test vs each OOD set.
        return [auroc(sv["id"], sv["held-out classes"])] + [auroc(st["id"], st[n]) for n in ood_names]

    rows, results = [], []
    for name, det in common.make_baselines(args, device).items():
        det.fit(val_fit)
        sv = {k: det.score(v) for k, v in val_parts.items()}
        det.fit(test_fit)
        vals = aurocs(sv, {k: det.score(v) for k, v in test_parts.items()})
        rows.append([name, "-", "-"] + [f"{100 * v:.2f}" for v in vals])
        results.append({"method": name, "auroc": dict(zip(cols, vals, strict=True))})
    for epochs in epochs_list:
        t0 = time.perf_counter()
        det_v = common.make_dlsr(args, encoder.boundaries, args.seed, device, epochs=epochs).fit(val_fit)
        det_t = common.make_dlsr(args, encoder.boundaries, args.seed, device, epochs=epochs).fit(test_fit)
        fit_s = (time.perf_counter() - t0) / 2
        sv = {k: det_v.score_all(v, scores=SCORES) for k, v in val_parts.items()}
        st = {k: det_t.score_all(v, scores=SCORES) for k, v in test_parts.items()}
        for score in SCORES:
            vals = aurocs({k: v[score] for k, v in sv.items()}, {k: v[score] for k, v in st.items()})
            rows.append([f"DLSR-{score}", epochs, f"{fit_s:.0f}"] + [f"{100 * v:.2f}" for v in vals])
            results.append(
                {"method": f"DLSR-{score}", "epochs": epochs, "fit_s": fit_s, "auroc": dict(zip(cols, vals, strict=True))}
            )
        print(f"  {epochs} epochs: fit {fit_s:.0f}s per model", file=sys.stderr, flush=True)

    wall = time.perf_counter() - t_start
    print(
        f"\n### AUROC % against LFDN epochs: {encoder.name} @{encoder.input_size}, {args.n_blocks} blocks of width "
        f"{args.width}, t={args.t}; validation: fit {len(val_fit)} (without {', '.join(held)}), ID val "
        f"{len(val_idx)}; test: fit {len(test_fit)}, ID test {len(id_test.features)}, seed {args.seed}\n"
    )
    print(
        common.markdown_table(
            ["method", "epochs", "fit s"] + [f"{c} (validation)" if c == cols[0] else c for c in cols], rows
        )
    )
    print(f"\nWall time {wall / 60:.1f} min on {common.device_name(device)}.")
    if args.json:
        meta = {
            "encoder": encoder.identity(),
            "n_blocks": args.n_blocks,
            "width": args.width,
            "t": args.t,
            "seed": args.seed,
            "device": common.device_name(device),
            "wall_s": wall,
            "git_commit": common.git_commit(),
        }
        common.write_json(args.json, {"rows": results, "meta": meta})
    return 0
