"""`dlsr bench ablations`: the paper's Figure 4 (AUROC vs t), Figure 5 / single- vs multi-layer features and
Table 4 (8 vs 16 LFDN blocks), on our data and the cached encoder features.

Models trained (one seed): A = the default LFDN on all stages; B = the same with the other depth; S = an LFDN
on the last stage's features only (single-layer). Per-layer rows score model A with the cosine of one layer.
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


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_data_arguments(p)
    p.add_argument(
        "--train-size", type=int, default=10000, help="CIFAR-10 train images to fit (default 10000)"
    )
    p.add_argument("--id-size", type=int, default=None, help="CIFAR-10 test images (default all)")
    p.add_argument("--ood-size", type=int, default=None, help="images per OOD set (default all)")
    p.add_argument("--t-list", default="1,2,3,4,5,6,8,10,12,15,20", help="noise levels for the t sweep")
    p.add_argument(
        "--other-blocks", type=int, default=None, help="depth compared with --n-blocks (default 8 or 16)"
    )
    p.add_argument("--seed", type=int, default=0)
    common.add_dlsr_arguments(p, epochs=DEFAULT_EPOCHS, n_blocks=DEFAULT_BLOCKS, t=DEFAULT_T)


def _layer_cos_scores(det, x: np.ndarray, boundaries, t: int, batch: int = 2048) -> np.ndarray:
    """(N, L) per-layer scores 1 - cos(z0_l, rec_l) of a fitted DLSR model."""
    import torch

    out = []
    for i in range(0, len(x), batch):
        z0 = torch.from_numpy(x[i : i + batch]).to(det.device)
        rec = det.reconstruct(z0, t=t)
        cols = [
            1 - torch.nn.functional.cosine_similarity(z0[:, a:b], rec[:, a:b], dim=1)
            for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)
        ]
        out.append(torch.stack(cols, 1).double().cpu().numpy())
    return np.concatenate(out)


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dlsr.metrics import auroc

    t_start = time.perf_counter()
    bench = common.setup(args, settings)
    root, device, encoder = bench.root, bench.device, bench.encoder
    ood_names = common.ood_set_names(root)
    load = bench.load
    train = load(common.ID_SET, "train", args.train_size).features
    id_x = load(common.ID_SET, "test", args.id_size).features
    ood = {n: load(n, "test", args.ood_size).features for n in ood_names}
    b = encoder.boundaries
    results: dict[str, Any] = {"t_sweep": [], "layers": [], "depth": []}

    def aurocs(score_fn) -> list[float]:
        s_id = score_fn(id_x)
        return [auroc(s_id, score_fn(v)) for v in ood.values()]

    fit_s = {}
    t0 = time.perf_counter()
    det_a = common.make_dlsr(args, b, args.seed, device).fit(train)
    fit_s["A"] = time.perf_counter() - t0

    # Figure 4: AUROC against t, all three scores, one trained model.
    rows_t = []
    for t in _ints(args.t_list):
        s_id = det_a.score_all(id_x, t=t)
        s_ood = {n: det_a.score_all(v, t=t) for n, v in ood.items()}
        for score in ("mse", "mfsim5", "mfsim4"):
            vals = [auroc(s_id[score], s_ood[n][score]) for n in ood_names]
            rows_t.append([t, score] + [f"{100 * v:.2f}" for v in vals])
            results["t_sweep"].append(
                {"t": t, "score": score, "auroc": dict(zip(ood_names, vals, strict=True))}
            )

    # Figure 5 / single- vs multi-layer: each layer's cosine alone, then layer sets, then a single-layer model.
    rows_l = []
    per_id = _layer_cos_scores(det_a, id_x, b, args.t)
    per_ood = {n: _layer_cos_scores(det_a, v, b, args.t) for n, v in ood.items()}
    n_layers = len(b) - 1
    choices = [(f"layer {i + 1} only", [i]) for i in range(n_layers)]
    choices += [
        (f"layers 2..{n_layers} (MFsim4)", list(range(1, n_layers))),
        (f"layers 1..{n_layers} (MFsim5)", list(range(n_layers))),
    ]
    for label, cols in choices:
        vals = [auroc(per_id[:, cols].mean(1), per_ood[n][:, cols].mean(1)) for n in ood_names]
        rows_l.append([f"model A, {label}"] + [f"{100 * v:.2f}" for v in vals])
        results["layers"].append(
            {"variant": f"model A, {label}", "auroc": dict(zip(ood_names, vals, strict=True))}
        )
    last = slice(b[-2], b[-1])
    t0 = time.perf_counter()
    det_s = common.make_dlsr(args, (0, b[-1] - b[-2]), args.seed, device).fit(
        np.ascontiguousarray(train[:, last])
    )
    fit_s["S"] = time.perf_counter() - t0
    for score in ("mse", "mfsim5"):
        vals = aurocs(lambda x, score=score: det_s.score(np.ascontiguousarray(x[:, last]), score=score))
        label = f"model S (last stage only, {b[-1] - b[-2]} dims), {'cosine' if score == 'mfsim5' else 'MSE'}"
        rows_l.append([label] + [f"{100 * v:.2f}" for v in vals])
        results["layers"].append({"variant": label, "auroc": dict(zip(ood_names, vals, strict=True))})

    # Table 4: depth.
    other = args.other_blocks or (8 if args.n_blocks != 8 else 16)
    t0 = time.perf_counter()
    det_b = common.make_dlsr(args, b, args.seed, device, n_blocks=other).fit(train)
    fit_s["B"] = time.perf_counter() - t0
    rows_d = []
    for blocks, det in sorted(((args.n_blocks, det_a), (other, det_b)), key=lambda p: p[0]):
        s_id = det.score_all(id_x)
        s_ood = {n: det.score_all(v) for n, v in ood.items()}
        for score in ("mse", "mfsim5", "mfsim4"):
            vals = [auroc(s_id[score], s_ood[n][score]) for n in ood_names]
            rows_d.append([blocks, score] + [f"{100 * v:.2f}" for v in vals])
            results["depth"].append(
                {"n_blocks": blocks, "score": score, "auroc": dict(zip(ood_names, vals, strict=True))}
            )

    sets = [f"AUROC % {n}" for n in ood_names]
    head = (
        f"{encoder.name} @{encoder.input_size}, fit {len(train)} CIFAR-10 train, ID test {len(id_x)}, "
        f"{args.epochs} epochs, seed {args.seed}"
    )
    print(f"\n### AUROC against t (paper Fig. 4): {head}, {args.n_blocks} blocks\n")
    print(common.markdown_table(["t", "score"] + sets, rows_t))
    print(f"\n### Single- vs multi-layer (paper Fig. 5 / Table 2): {head}, t={args.t}\n")
    print(common.markdown_table(["variant"] + sets, rows_l))
    print(f"\n### LFDN depth (paper Table 4): {head}, t={args.t}\n")
    print(common.markdown_table(["blocks", "score"] + sets, rows_d))
    wall = time.perf_counter() - t_start
    print(
        f"\nWall time {wall / 60:.1f} min on {common.device_name(device)} "
        f"(fits: {', '.join(f'{k} {v:.0f}s' for k, v in fit_s.items())})."
    )
    if args.json:
        results["meta"] = {
            "encoder": encoder.identity(),
            "n_fit": len(train),
            "n_id_test": len(id_x),
            "epochs": args.epochs,
            "n_blocks": args.n_blocks,
            "other_blocks": other,
            "t": args.t,
            "seed": args.seed,
            "device": common.device_name(device),
            "wall_s": wall,
            "git_commit": common.git_commit(),
        }
        common.write_json(args.json, results)
    print("", file=sys.stderr)
    return 0
