"""Layer-wise fusion: per-stage conformal p-values combined into one calibrated score.

Each column of a detector's per-stage scores (`BaseDetector.score_stages`; DLSR's per-layer reconstruction error,
the Gaussian baseline's per-stage Mahalanobis distance, or both side by side) gives a conformal p-value against
held-out ID scores of that column (`dlsr.evidence.stage_p_values`). A rule combines an image's S p-values into
one statistic, higher = more unusual (docs/METHOD.md section 4):

    fisher       T = -2 sum_l log p_l                        (Fisher 1925; MLOD, arXiv 2403.10803)
    simes        T = -log min_k (S p_(k) / k)                (Simes 1986; p_(1) <= ... <= p_(S))
    bonferroni   T = -log (S min_l p_l)                      (min-p with a Bonferroni correction)

The stages of one image are strongly dependent, so none of the textbook null distributions holds (Fisher's
chi-square with 2S degrees of freedom assumes independence). The statistic is therefore re-calibrated
conformally, by a split of the calibration set (`StageFusion.fit`): one part (the reference) gives the per-stage
p-values, the other part's fused statistics give the conformal threshold and p-values of the fused score. A
calibration image's stage p-values against the reference are then exchangeable with a new ID image's, so the
finite-sample guarantee P(flag | ID) <= alpha holds exactly, whatever the dependence between stages. Why a
split and not a leave-one-out rank over the whole set: the split gives one fixed threshold on the statistic
(what the monitor applies per record); the exact leave-one-out alternative (full conformal over the n + 1
images) changes every calibration statistic with each new image, and the approximate one (each calibration
image against the other n - 1) is off by up to 1 / n in each stage p-value, which breaks the exact guarantee.
The cost is resolution: stage p-values from n/2 reference scores, the threshold from the other n/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from dlsr.calibration import conformal_threshold, p_values
from dlsr.evidence import stage_p_values

Rule = Literal["fisher", "simes", "bonferroni"]
RULES: tuple[Rule, ...] = ("fisher", "simes", "bonferroni")


def check_rule(rule: str) -> Rule:
    """Return `rule` when it is a known fusion rule, else raise ValueError naming the choices."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule  # type: ignore[return-value]


def combine(p: np.ndarray, rule: str) -> np.ndarray:
    """One statistic per row from (N, S) p-values in (0, 1]: higher = more unusual.

    Args:
        p: (N, S) per-stage p-values (or one (S,) row).
        rule: "fisher", "simes" or "bonferroni" (module docstring).

    Returns:
        (N,) float64. Simes and Bonferroni give -log of the combined p-value, unclipped at 1 (clipping would only
        create ties, and the statistic is re-calibrated anyway).
    """
    rule = check_rule(rule)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:
        p = p.reshape(1, -1)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"p-values must be (N, S) with S >= 1; got shape {p.shape}")
    if np.any(~(p > 0)):
        raise ValueError("p-values must be in (0, 1]; conformal p-values are never 0 (check the input)")
    log_p = np.log(p)
    n_stages = p.shape[1]
    if rule == "fisher":
        return -2.0 * log_p.sum(axis=1)
    if rule == "bonferroni":
        return -(np.log(n_stages) + log_p.min(axis=1))
    # Simes: min over k of S p_(k) / k, in logs.
    ranks = np.log(n_stages / np.arange(1, n_stages + 1))
    return -(np.sort(log_p, axis=1) + ranks).min(axis=1)


@dataclass(frozen=True)
class StageFusion:
    """A fusion rule calibrated on a split of the ID calibration set (module docstring).

    Attributes:
        rule: the combining rule.
        reference: (n_ref, S) per-stage scores that give the per-stage p-values.
        calibration: (n_cal,) fused statistics of the other calibration images (the conformal reference).
    """

    rule: Rule
    reference: np.ndarray
    calibration: np.ndarray

    @classmethod
    def fit(
        cls, cal_stage_scores: np.ndarray, rule: str = "fisher", *, reference_fraction: float = 0.5, seed: int = 0
    ) -> StageFusion:
        """Split the (n, S) calibration stage scores (seeded permutation), fuse the second part against the first.

        Args:
            cal_stage_scores: (n, S) per-stage scores of held-out ID images, n >= 2.
            rule: "fisher", "simes" or "bonferroni".
            reference_fraction: share of the rows that give the per-stage p-values (the rest calibrate the
                fused statistic).
            seed: seeds the split (the rows may come in any order, e.g. grouped by class).
        """
        rule = check_rule(rule)
        cal = np.asarray(cal_stage_scores, dtype=np.float64)
        if cal.ndim != 2 or cal.shape[0] < 2:
            raise ValueError(f"calibration stage scores must be (n, S) with n >= 2; got shape {cal.shape}")
        if not 0.0 < reference_fraction < 1.0:
            raise ValueError(f"reference_fraction must be in (0, 1); got {reference_fraction!r}")
        n_ref = min(max(1, round(cal.shape[0] * reference_fraction)), cal.shape[0] - 1)
        order = np.random.default_rng(seed).permutation(cal.shape[0])
        reference, held = cal[order[:n_ref]], cal[order[n_ref:]]
        return cls(rule, reference, combine(stage_p_values(reference, held), rule))

    @property
    def n_stages(self) -> int:
        return int(self.reference.shape[1])

    def statistic(self, stage_scores: np.ndarray) -> np.ndarray:
        """(N,) fused statistic of (N, S) per-stage scores: the score to rank or threshold, higher = more OOD."""
        return combine(stage_p_values(self.reference, stage_scores), self.rule)

    def threshold(self, alpha: float) -> float:
        """The conformal threshold on `statistic` at false-alarm rate alpha (`conformal_threshold`)."""
        return conformal_threshold(self.calibration, alpha)

    def p_values(self, stage_scores: np.ndarray) -> np.ndarray:
        """(N,) conformal p-values of the fused statistic: uniform-or-larger for ID images."""
        return self.p_values_of(self.statistic(stage_scores))

    def p_values_of(self, statistic: np.ndarray) -> np.ndarray:
        """(N,) conformal p-values of statistics already computed by `statistic`."""
        return p_values(self.calibration, statistic)
