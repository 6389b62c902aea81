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
    assert {r["method"] for r in rows} == set(common.METHODS)
    assert len(rows) == len(common.METHODS) * (len(sets) + (1 if payload["meta"]["far_ood_sets"] else 0))
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
    assert "### Shift among flagged images" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    rows = payload["rows"]
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
