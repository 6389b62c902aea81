"""`dlsr bench speed --runtimes`: configuration syntax, and one tiny end-to-end run (speed, not figures)."""

from __future__ import annotations

import json

import pytest

from dlsr_monitor.bench.speed_runtimes import Config, parse_configs
from dlsr_monitor.cli.main import main


def test_parse_configs():
    assert parse_configs("torch,openvino:bf16,openvino:fp32:2,onnxruntime:fp32::1") == [
        Config("torch", "fp32"),
        Config("openvino", "bf16"),
        Config("openvino", "fp32", 2),
        Config("onnxruntime", "fp32", 1, 1),
    ]
    assert parse_configs("onnxruntime", "bf16") == [Config("onnxruntime", "bf16")]
    assert parse_configs("openvino:int8") == [Config("openvino", "int8")]
    assert Config("openvino", "fp32", 2, 1).label == "openvino fp32 x2 streams, 1 thread"
    for bad in ("openvino:fp16", "torch:fp32:2", ""):
        with pytest.raises(SystemExit):
            parse_configs(bad)


def test_bench_speed_runtimes_json(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DLSR_MODEL__EXPORT_CACHE", str(tmp_path / "exports"))
    out = tmp_path / "r.json"
    rc = main([
        "bench", "speed", "--backbone", "test_efficientnet", "--weights", "random", "--input-size", "32",
        "--runtimes", "onnxruntime,openvino:fp32:2", "--data-dir", str(data_dir), "--batch-sizes", "1,4",
        "--batches", "1", "--min-images", "2", "--repeats", "1", "--n-blocks", "1", "--t", "1",
        "--json", str(out),
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    # torch fp32 is added as the reference of every ratio
    assert [(r["runtime"], r["streams"], r["batch_size"]) for r in rows] == [
        ("torch", 1, 1), ("onnxruntime", 1, 1), ("openvino", 2, 1),
        ("torch", 1, 4), ("onnxruntime", 1, 4), ("openvino", 2, 4),
    ]
    for r in rows:
        assert {"runtime", "precision", "batch_size", "images_s", "ratio_vs_torch_fp32"} <= set(r)
        assert r["images_s"] > 0 and abs(sum(r["share"].values()) - 1) < 1e-9
    assert all(r["ratio_vs_torch_fp32"] == 1.0 for r in rows if r["runtime"] == "torch")
    assert {"cpu", "threads", "load_average"} <= set(result["meta"])


def test_bench_quality_json(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLSR_MODEL__EXPORT_CACHE", str(tmp_path / "exports"))
    out = tmp_path / "q.json"
    rc = main([
        "bench", "quality", "--backbone", "test_efficientnet", "--weights", "random", "--input-size", "32",
        "--runtimes", "onnxruntime,onnxruntime:int8", "--data-dir", str(data_dir), "--cache-dir",
        str(tmp_path / "cache"), "--train-size", "60", "--cal-size", "30", "--quant-size", "16", "--id-size", "30",
        "--ood-size", "30", "--epochs", "1", "--n-blocks", "1", "--json", str(out),
    ])
    assert rc == 0
    assert "| runtime | method | AUROC %" in capsys.readouterr().out
    result = json.loads(out.read_text())
    configs = [(r["runtime"], r["precision"]) for r in result["rows"]]
    assert configs == [(rt, p) for rt, p in [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
                       for _ in range(2)]  # torch fp32 added as the reference; two methods each
    by = {(r["runtime"], r["precision"], r["method"]): r for r in result["rows"]}
    for r in result["rows"]:
        assert set(r["auroc"]) == set(result["meta"]["ood_sets"]) and 0 <= r["false_alarm_rate"] <= 1
    assert by[("torch", "fp32", "Mahalanobis")]["feature_abs_error"]["max"] == 0
    assert by[("onnxruntime", "fp32", "Mahalanobis")]["feature_abs_error"]["max"] < 1e-4
    assert by[("onnxruntime", "int8", "Mahalanobis")]["feature_abs_error"]["max"] > 1e-4  # really quantized
    assert result["meta"]["n_quant"] == 16 and result["meta"]["n_fit"] == 60
