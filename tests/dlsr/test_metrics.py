"""Metrics against scikit-learn (ties included) and on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dlsr.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics


def _sk_fpr95(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]  # ID positive, low score = ID
    fpr, tpr, _ = roc_curve(y, -np.r_[id_s, ood_s], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


@pytest.mark.parametrize("seed", range(6))
def test_against_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    id_s = np.round(rng.normal(0.0, 1.0, 300 + seed * 37), 1)  # rounding creates many ties
    ood_s = np.round(rng.normal(1.0 + 0.2 * seed, 1.0, 200), 1)
    y_ood = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
    s = np.r_[id_s, ood_s]
    assert auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y_ood, s), abs=1e-12)
    assert aupr_out(id_s, ood_s) == pytest.approx(average_precision_score(y_ood, s), abs=1e-12)
    assert aupr_in(id_s, ood_s) == pytest.approx(average_precision_score(1 - y_ood, -s), abs=1e-12)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(_sk_fpr95(id_s, ood_s), abs=1e-12)


def test_hand_made_cases() -> None:
    assert auroc([0, 1, 2], [3, 4]) == 1.0
    assert auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    m = ood_metrics(np.arange(100.0), np.arange(100.0) + 1000)
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    # 95 of 100 ID scores are 0, so the 95%-TPR threshold is 0: OOD at -1 is accepted, 20 is not.
    id_s = np.r_[np.zeros(95), np.full(5, 50.0)]
    assert fpr_at_tpr(id_s, np.array([-1.0, 20.0])) == 0.5


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([np.nan, 1.0], [1.0])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [2.0], tpr=0.0)
