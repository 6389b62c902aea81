"""The benchmark commands end to end on a tiny random backbone and a few real images (speed, not quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlsr_monitor.bench import common
from dlsr_monitor.cli.main import main

TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--input-size", "32"]


@pytest.fixture
def tiny_args(data_dir, tmp_path):
    return ["--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), *TINY]


def test_bench_ood_json_and_table(tiny_args, tmp_path, capsys):
    out = tmp_path / "ood.json"
    rc = main(
        [
            "bench",
            "ood",
            *tiny_args,
            "--train-size",
            "120",
            "--cal-size",
            "40",
            "--id-size",
            "60",
            "--ood-size",
            "60",
            "--epochs",
            "1",
            "--n-blocks",
            "1",
            "--seeds",
            "2",
            "--knn-k",
            "5",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | OOD set | AUROC %" in printed and "images/s" in printed
    payload = json.loads(out.read_text())
    sets = payload["meta"]["ood_sets"]
    assert "cifar10" not in sets and len(sets) >= 1
    rows = payload["rows"]
    every = set(common.METHODS) | set(common.FUSED_METHODS)
    assert {r["method"] for r in rows} == every and len(common.FUSED_METHODS) == 15
    assert len(rows) == len(every) * (len(sets) + (1 if payload["meta"]["far_ood_sets"] else 0))
    # the fused scores: a comparison table, and their false-alarm rates at alpha like every single score
    assert "### Fused vs single scores" in printed and "| set | best single score |" in printed
    assert set(payload["meta"]["id_test_false_alarm_rate"]) == every
    assert all(0.0 <= v <= 1.0 for v in payload["meta"]["id_test_false_alarm_rate"].values())
    for r in rows:
        for k in ("auroc", "fpr95", "aupr_in", "aupr_out", "auroc_std"):
            assert 0.0 <= r[k] <= 1.0, (r, k)
    assert payload["meta"]["seeds"] == 2 and payload["meta"]["n_fit"] == 120
    # the shift among flagged images, per set, for the default --shift-methods (DLSR-MFsim4, Mahalanobis)
    assert "### Shift among flagged images" in printed and "| method | set | flagged / images |" in printed
    shift = payload["shift"]
    assert [(r["method"], r["set"]) for r in shift] == [
        (m, s) for m in ("DLSR-MFsim4", "Mahalanobis") for s in ("cifar10", *sets)
    ]
    for r in shift:
        assert r["n"] == (2 * 60) and 0 <= r["n_flagged"] <= r["n"]
        assert r["low_level"] + r["semantic"] + r["mixed"] == r["n_flagged"]
        if r["n_flagged"]:
            assert abs(sum(r[f"{k}_fraction"] for k in ("low_level", "semantic", "mixed")) - 1.0) < 1e-9
    # a second run hits the feature cache: nothing is encoded again
    capsys.readouterr()
    rc = main(
        [
            "bench",
            "ood",
            *tiny_args,
            "--train-size",
            "120",
            "--cal-size",
            "40",
            "--id-size",
            "60",
            "--ood-size",
            "60",
            "--epochs",
            "1",
            "--n-blocks",
            "1",
            "--seeds",
            "1",
            "--methods",
            "kNN",
        ]
    )
    assert rc == 0 and "encoded" not in capsys.readouterr().err


def test_bench_corruptions(tiny_args, tmp_path, capsys):
    out = tmp_path / "c.json"
    rc = main(
        [
            "bench",
            "corruptions",
            *tiny_args,
            "--train-size",
            "80",
            "--id-size",
            "20",
            "--epochs",
            "1",
            "--n-blocks",
            "1",
            "--corruptions",
            "gaussian_noise,occlusion",
            "--severities",
            "1,5",
            "--knn-k",
            "5",
            "--cal-size",
            "40",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "### Shift among flagged images" in printed and "### Fused vs single scores" in printed
    assert "| false alarms % (clean ID) | alpha=0.05 |" in printed
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert set(rows[0]["auroc"]) == set(common.METHODS) | set(common.FUSED_METHODS)
    assert set(payload["meta"]["clean_false_alarm_rate"]) == set(rows[0]["auroc"])
    shift = payload["shift"]
    assert [(r["method"], r["corruption"], r["severity"]) for r in shift] == [
        (m, c, s)
        for m in ("DLSR-MFsim4", "Mahalanobis")
        for c, s in [("none (clean ID)", "-"), ("gaussian_noise", "1"), ("gaussian_noise", "5"),
                     ("occlusion", "1"), ("occlusion", "5"), ("all corrupted", "all")]
    ]
    assert all(r["low_level"] + r["semantic"] + r["mixed"] == r["n_flagged"] <= r["n"] for r in shift)
    assert payload["meta"]["n_cal"] == 40
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        ("gaussian_noise", 1),
        ("gaussian_noise", 5),
        ("occlusion", 1),
        ("occlusion", 5),
    ]
    assert all(0.0 <= v <= 1.0 for r in rows for v in r["auroc"].values())
    assert main(["bench", "corruptions", *tiny_args, "--corruptions", "fog"]) == 2


def test_bench_speed(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(
        [
            "bench",
            "speed",
            *TINY,
            "--batch-sizes",
            "4,8",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--n-blocks",
            "1",
            "--t",
            "2",
            "--precision",
            "bf16",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["meta"]["precision"] == "bf16 autocast encoder"
    assert [r["batch_size"] for r in rows] == [4, 8]
    assert all(r["encoder_images_per_s"] > 0 and 0 < r["encoder_time_share"] < 1 for r in rows)


@pytest.mark.slow
def test_bench_ablations(tiny_args, tmp_path):
    out = tmp_path / "a.json"
    rc = main(
        [
            "bench",
            "ablations",
            *tiny_args,
            "--train-size",
            "80",
            "--id-size",
            "30",
            "--ood-size",
            "30",
            "--epochs",
            "1",
            "--n-blocks",
            "1",
            "--other-blocks",
            "2",
            "--t-list",
            "1,3",
            "--knn-k",
            "5",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert {r["t"] for r in res["t_sweep"]} == {1, 3}
    assert {r["n_blocks"] for r in res["depth"]} == {1, 2}
    assert any("layer 1 only" in r["variant"] for r in res["layers"])


def test_bench_epochs(tiny_args, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(
        [
            "bench",
            "epochs",
            *tiny_args,
            "--pool-size",
            "200",
            "--cal-size",
            "40",
            "--val-size",
            "30",
            "--id-size",
            "40",
            "--ood-size",
            "40",
            "--epochs-list",
            "1,2",
            "--n-blocks",
            "1",
            "--knn-k",
            "5",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert "held-out classes (validation)" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["epochs"] for r in rows if "epochs" in r} == {1, 2}
    assert {r["method"] for r in rows} == {"kNN", "Mahalanobis", "DLSR-mse", "DLSR-mfsim5", "DLSR-mfsim4"}
    for r in rows:
        assert set(r["auroc"]) >= {"held-out classes", "mnist"}
        assert all(0.0 <= v <= 1.0 for v in r["auroc"].values())


@pytest.mark.slow
def test_bench_validate(tiny_args, tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = main(
        ["bench", "validate", *tiny_args, "--pool-size", "120", "--val-size", "20", "--corruptions", "pixelate"]
        + ["--blocks-list", "1", "--epochs-list", "1", "--t-list", "1,2", "--knn-k", "5", "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out classes" in printed and "pixelate5" in printed
    assert out.is_file()


def test_bench_validate_fused(tiny_args, tmp_path, capsys):
    """--cal-size: the fused scores are validated too, for the Gaussian and for each DLSR configuration and t."""
    out = tmp_path / "v.json"
    rc = main(
        ["bench", "validate", *tiny_args, "--pool-size", "160", "--val-size", "20", "--corruptions", "pixelate"]
        + ["--blocks-list", "1", "--epochs-list", "1", "--t-list", "1", "--knn-k", "5", "--cal-size", "40"]
        + ["--fused", "fisher(Gauss),simes(DLSR),bonferroni(DLSR+Gauss),fisher(DLSR+Gauss+main)", "--json", str(out)]
    )
    assert rc == 0
    assert "fused scores calibrated on 40" in capsys.readouterr().out
    labels = [r[0] for r in json.loads(out.read_text())["rows"]]
    assert "fisher(Gauss)" in labels
    assert any(lab.endswith("t=1, simes(DLSR)") for lab in labels)
    assert any(lab.endswith("t=1, bonferroni(DLSR+Gauss)") for lab in labels)
    assert any(lab.endswith("t=1, fisher(DLSR+Gauss+main)") for lab in labels)
    assert not any("fisher(DLSR)" in lab for lab in labels)


def test_fusion_helpers():
    assert common.fusion_sources("simes(DLSR+Gauss)") == ("DLSR-MFsim4", "Mahalanobis")
    args = type("A", (), {"fused": None})()
    assert common.fused_methods(args, ["Mahalanobis"]) == [
        f"{r}({s})" for s in ("Gauss", "Gauss+main") for r in ("fisher", "simes", "bonferroni")
    ]
    assert common.stage_methods(["fisher(DLSR+Gauss+main)"]) == {"DLSR-MFsim4", "Mahalanobis"}
    cols = common.source_columns({"A": np.ones(3), "A:stages": np.zeros((3, 2))}, "A:main")
    assert cols.shape == (3, 1) and common.source_columns({"A:stages": np.zeros((3, 2))}, "A").shape == (3, 2)
    args.fused = "fisher(DLSR)"
    with pytest.raises(SystemExit, match="needs"):
        common.fused_methods(args, ["Mahalanobis"])
    rows = [{"method": m, "set": "x", "auroc": a} for m, a in [("A", 0.8), ("B", 0.9), ("f(A)", 0.95), ("g(A)", 0.7)]]
    headers, table = common.fusion_comparison(rows, ["A", "B"], ["f(A)", "g(A)"], key="set")
    assert table == [["x", "B", "90.00", "f(A)", "95.00", "+5.00"]]


def test_common_helpers(data_dir):
    assert "cifar10" not in common.ood_set_names(data_dir)
    names = [f"{c}/{i}.jpg" for c in ("cat", "dog", "ship") for i in range(8)]
    fit, val, held, classes = common.holdout_split(names, "cat", val_size=3, seed=0)
    assert classes == ["cat"] and held.sum() == 8 and len(val) == 3
    assert not set(fit) & set(val) and not held[fit].any() and not held[val].any()
    assert len(fit) + len(val) + held.sum() == len(names)
    a, b = common.split_indices(10, 3, seed=1)
    assert len(a) == 3 and sorted(np.concatenate([a, b]).tolist()) == list(range(10))
    assert np.array_equal(a, common.split_indices(10, 3, seed=1)[0])
    assert common.pm([0.5, 0.7]) == "60.00 ± 10.00" and common.pm([0.25]) == "25.00"


def test_bench_input_size(tiny_args, tmp_path, capsys):
    out = tmp_path / "input_size.json"
    args = [a for a in tiny_args if a not in ("--input-size", "32")]  # the sweep sets the size
    rc = main(
        ["bench", "input-size", *args, "--sizes", "32,64", "--train-size", "120", "--cal-size", "40",
         "--id-size", "60", "--ood-size", "60", "--epochs", "1", "--n-blocks", "1", "--speed-images", "32",
         "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| input size | pixels vs 32x32 | method |" in printed and "encoder img/s torch" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["input_size"], r["method"]) for r in rows] == [
        (32, "DLSR-MFsim4"), (32, "Mahalanobis"), (64, "DLSR-MFsim4"), (64, "Mahalanobis")
    ]
    for r in rows:
        assert all(0.0 <= v <= 1.0 for v in r["auroc"].values()) and r["encoder_images_s"]["torch"] > 0
    rc = main(["bench", "input-size", *args, "--sizes", "32", "--speed-only", "--speed-images", "32", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["rows"][0]["encoder_images_s"]["torch"] > 0


def test_bench_calibration(tiny_args, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    rc = main(["bench", "calibration", *tiny_args, "--quick", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | n | alpha | delta | rank k | FA mean % | FA p90 % | FA p99 %" in printed
    assert "pac keeps the 90th percentile within alpha at delta 0.1:" in printed
    payload = json.loads(out.read_text())
    assert set(payload) == {"rows", "meta"}
    rows = payload["rows"]
    assert [(r["method"], r["n"], r["alpha"]) for r in rows] == [
        (m, n, 0.05) for n in (100, 250) for m in ("marginal", "pac")
    ]
    for r in rows:
        assert set(r) == {"method", "n", "alpha", "delta", "fa_mean", "fa_p90", "fa_p99"}
        assert 0.0 <= r["fa_mean"] <= r["fa_p99"] <= 1.0 and r["fa_p90"] <= r["fa_p99"]
        assert r["delta"] == (0.1 if r["method"] == "pac" else None)
    # pac is never looser than marginal on the same draws.
    by = {(r["method"], r["n"]): r for r in rows}
    for n in (100, 250):
        assert by["pac", n]["fa_mean"] <= by["marginal", n]["fa_mean"]
    assert payload["meta"]["draws"] == 20 and payload["meta"]["pool_images"] == 600
    assert payload["meta"]["pac_min_calibration"] == {"0.05": 45}
    assert payload["meta"]["pac_exact_within_delta"] is True  # the exact law of every pac row: P(FA > alpha) <= delta


def test_realised_rates_follow_the_beta_law_on_exchangeable_scores():
    from scipy import stats

    from dlsr.calibration import pac_rank
    from dlsr_monitor.bench.calibration import exact_law, realised_rates

    scores = np.random.default_rng(1).random(20000)
    n, alpha, delta = 500, 0.05, 0.1
    rates = realised_rates(scores, n, alpha, draws=400, delta=delta, seed=0)
    k = pac_rank(n, alpha, delta)
    # The pac rate's 90th percentile is near the Beta(n - k + 1, k) 0.9 quantile and within alpha.
    assert np.quantile(rates["pac"], 0.9) <= alpha
    assert np.quantile(rates["pac"], 0.9) == pytest.approx(stats.beta.ppf(0.9, n - k + 1, k), abs=0.006)
    assert np.mean(rates["marginal"]) == pytest.approx(1 - 476 / 501, abs=0.003)  # marginal: k = 476
    p90, above = exact_law(n, k, alpha)
    assert p90 == pytest.approx(stats.beta.ppf(0.9, n - k + 1, k)) and above == pytest.approx(
        stats.beta.sf(alpha, n - k + 1, k)
    )
    assert above <= delta < exact_law(n, k - 1, alpha)[1] and exact_law(n, n + 1, alpha) == (0.0, 0.0)


def test_bench_drift(tiny_args, tmp_path, capsys):
    out = tmp_path / "d.json"
    rc = main(
        ["bench", "drift", *tiny_args, "--train-size", "80", "--cal-size", "40", "--epochs", "1", "--alpha", "0.05",
         "--pool-clips", "3", "--shift-clips", "2", "--frames", "4000", "--seeds", "2", "--shift-at", "2000",
         "--after", "1500", "--eval-every", "50", "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| test | stream | false alarms / 100k frames" in printed and "whole clips from a pool" in printed
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [(r["test"], r["stream"]) for r in rows] == [("old", "iid"), ("new", "iid"), ("old", "video"),
                                                       ("new", "video")]
    for r in rows:
        assert r["false_alarms_per_100k"] >= 0 and len(r["false_alarms_per_seed"]) == 2
        for k in ("delay_ood_frames", "delay_corrupt_frames"):
            assert r[k] is None or 0 < r[k] <= 1500
    assert payload["meta"]["pool"]["id_clips"] == 3 and payload["meta"]["frames"] == 4000
