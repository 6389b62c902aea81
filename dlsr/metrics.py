"""OOD detection metrics in numpy: AUROC, FPR at 95% TPR, AUPR-in, AUPR-out (ties handled like scikit-learn).

Convention: scores are "higher = more OOD". FPR95 and AUPR-in treat in-distribution as the positive class
(an image is called ID when its score is low), as in the OOD literature; AUROC is symmetric.
"""

from __future__ import annotations

import numpy as np


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need at least one ID and one OOD score; got {a.size} ID and {b.size} OOD")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores contain NaN or infinite values; check the model before computing metrics")
    return a, b


def _binary_clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives) at each distinct threshold, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # Tied scores share one threshold: keep only the last index of each run of equal scores.
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = (1 + idx) - tps
    return fps.astype(np.float64), tps.astype(np.float64)


def _labels_scores(pos: np.ndarray, neg: np.ndarray, pos_high: bool) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    s = np.r_[pos, neg]
    return y, (s if pos_high else -s)


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(OOD score > ID score) + 0.5 P(tie): the Mann-Whitney statistic with average ranks for ties."""
    a, b = _check(id_scores, ood_scores)
    allv = np.r_[a, b]
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(allv.size, dtype=np.float64)
    # Average rank over each run of tied values.
    starts = np.r_[0, np.where(np.diff(sorted_v))[0] + 1]
    ends = np.r_[starts[1:], allv.size]
    avg = (starts + ends + 1) / 2.0  # 1-based mean rank of the run
    ranks[order] = np.repeat(avg, ends - starts)
    r_ood = ranks[a.size :].sum()
    u = r_ood - b.size * (b.size + 1) / 2.0
    return float(u / (a.size * b.size))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD images accepted as ID at the loosest threshold that accepts at least `tpr` of ID."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr}")
    a, b = _check(id_scores, ood_scores)
    y, s = _labels_scores(a, b, pos_high=False)  # ID positive, low score = positive
    fps, tps = _binary_clf_curve(y, s)
    tpr_curve = tps / a.size
    fpr_curve = fps / b.size
    i = int(np.searchsorted(tpr_curve, tpr - 1e-12, side="left"))
    return float(fpr_curve[min(i, fpr_curve.size - 1)])


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise average precision, sum_n (R_n - R_{n-1}) P_n, as scikit-learn computes it."""
    fps, tps = _binary_clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the precision-recall curve with in-distribution as positive (low score = ID)."""
    a, b = _check(id_scores, ood_scores)
    return _average_precision(*_labels_scores(a, b, pos_high=False))


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the precision-recall curve with OOD as positive (high score = OOD)."""
    a, b = _check(id_scores, ood_scores)
    return _average_precision(*_labels_scores(b, a, pos_high=True))


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """All four metrics as fractions in [0, 1]: keys auroc, fpr95, aupr_in, aupr_out."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }
