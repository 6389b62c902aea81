"""Promotion gates: pure checks on a candidate's scores. Each returns a GateResult saying passed or by how much not.

- finite: every score the candidate produced (calibration, held-out, reference) is a finite number.
- false_alarm: on fresh held-out vetted ID images (used neither to fit nor to calibrate) the flag rate is at most
  alpha + k * sigma, sigma = sqrt(alpha (1 - alpha) / n) (binomial; k = `sigmas`). The conformal threshold
  promises a rate <= alpha on exchangeable data, so a rate well above it means the calibration is off.
- reference_shift: a fixed reference ID sample, scored by the candidate and by the live model, each against its own
  calibration set (p-values, so the models' score scales do not matter): the mean p-value may move by at most
  `max_shift`. It stops a refit that quietly redefines "normal" for data that was normal yesterday.
- auroc (optional): against a configured reference OOD set, AUROC >= `min_auroc`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome; `value` vs `bound` says by how much it passed or failed."""

    name: str
    passed: bool
    value: float | None
    bound: float | None
    detail: str

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("value", "bound"):  # JSON has no NaN/inf
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d


def gate_finite(**named_scores: np.ndarray) -> GateResult:
    """No NaN or inf in any of the named score arrays."""
    bad = {
        name: int((~np.isfinite(np.asarray(s, dtype=np.float64))).sum()) for name, s in named_scores.items()
    }
    total = sum(bad.values())
    n = sum(int(np.asarray(s).size) for s in named_scores.values())
    where = ", ".join(f"{k}={v}" for k, v in bad.items() if v) or "none"
    return GateResult("finite", total == 0, float(total), 0.0, f"{total} of {n} scores are NaN/inf ({where})")


def false_alarm_bound(alpha: float, n: int, sigmas: float) -> float:
    """alpha + sigmas * sqrt(alpha (1 - alpha) / n): the largest held-out flag rate still consistent with alpha."""
    return alpha + sigmas * math.sqrt(alpha * (1.0 - alpha) / max(n, 1))


def gate_false_alarm(
    holdout_scores: np.ndarray, threshold: float, alpha: float, sigmas: float = 3.0
) -> GateResult:
    """Held-out ID flag rate (score > threshold) within the binomial tolerance of alpha."""
    s = np.asarray(holdout_scores, dtype=np.float64)
    n = int(s.size)
    if n == 0:
        return GateResult(
            "false_alarm", False, None, None, "no held-out vetted images: nothing to check against"
        )
    rate = float((s > threshold).mean())
    bound = false_alarm_bound(alpha, n, sigmas)
    ok = rate <= bound
    how = "within" if ok else f"exceeds by {rate - bound:.4f}"
    return GateResult(
        "false_alarm",
        ok,
        rate,
        bound,
        f"held-out flag rate {rate:.4f} on n={n} vs alpha={alpha} + {sigmas:g} sigma = {bound:.4f} ({how})",
    )


def _p_values(cal: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # (1 + #{cal >= s}) / (n + 1), as dlsr.calibration.p_values; kept local so this module stays dependency-free.
    cal_sorted = np.sort(np.asarray(cal, dtype=np.float64))
    ge = cal_sorted.size - np.searchsorted(cal_sorted, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + ge) / (cal_sorted.size + 1.0)


def gate_reference_shift(
    new_ref: np.ndarray,
    new_cal: np.ndarray,
    old_ref: np.ndarray | None,
    old_cal: np.ndarray | None,
    max_shift: float = 0.1,
) -> GateResult:
    """Mean p-value of the reference ID sample under the candidate vs under the live model."""
    if old_ref is None or old_cal is None or len(old_ref) == 0 or len(new_ref) == 0:
        return GateResult(
            "reference_shift", True, None, max_shift, "no live model or reference sample: skipped"
        )
    p_new = float(_p_values(new_cal, new_ref).mean())
    p_old = float(_p_values(old_cal, old_ref).mean())
    shift = abs(p_new - p_old)
    ok = shift <= max_shift
    how = "within" if ok else f"exceeds by {shift - max_shift:.3f}"
    return GateResult(
        "reference_shift",
        ok,
        shift,
        max_shift,
        f"reference mean p-value {p_new:.3f} (candidate) vs {p_old:.3f} (live) on n={len(new_ref)}: "
        f"shift {shift:.3f}, bound {max_shift:g} ({how})",
    )


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Probability that an OOD score exceeds an ID score (ties count half): the Mann-Whitney AUROC."""
    a = np.asarray(id_scores, dtype=np.float64)
    b = np.asarray(ood_scores, dtype=np.float64)
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_ood = ranks[a.size :].sum()
    return float((r_ood - b.size * (b.size + 1) / 2.0) / (a.size * b.size))


def gate_auroc(id_scores: np.ndarray, ood_scores: np.ndarray | None, min_auroc: float = 0.9) -> GateResult:
    """AUROC of held-out ID vs the reference OOD set at least `min_auroc` (skipped without an OOD set)."""
    if ood_scores is None or len(ood_scores) == 0:
        return GateResult("auroc", True, None, min_auroc, "no reference OOD set configured: skipped")
    if len(id_scores) == 0:
        return GateResult("auroc", False, None, min_auroc, "no held-out ID scores to compare with")
    value = auroc(id_scores, ood_scores)
    ok = value >= min_auroc
    how = "passes" if ok else f"short by {min_auroc - value:.4f}"
    return GateResult(
        "auroc",
        ok,
        value,
        min_auroc,
        f"AUROC {value:.4f} vs reference OOD (n={len(ood_scores)}), min {min_auroc:g} ({how})",
    )


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def as_json(results: list[GateResult]) -> dict[str, dict]:
    """{name: result dict} for the registry entry and the job history."""
    return {r.name: r.as_dict() for r in results}
