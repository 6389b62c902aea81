"""Settings refused at load with one line each: values that are not JSON, devices, encoders, stages, bootstrap
lists, and errors from the TOML file that name the file instead of an env var."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from dlsr_monitor.config import Settings, load_settings, settings_error_lines
from dlsr_monitor.config.timm_names import check_model_name, timm_model_names


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _line(monkeypatch, **env: str) -> str:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as info:
        load_settings()
    (line,) = settings_error_lines(info.value, Settings)
    return line


def test_a_list_that_is_not_json_is_one_line_with_the_json_it_meant(monkeypatch):
    line = _line(monkeypatch, DLSR_MODEL__STAGES="1,2")
    assert line.startswith("invalid setting model.stages (env DLSR_MODEL__STAGES) (got '1,2')")
    assert "[1, 2]" in line


def test_a_dict_that_is_not_json_is_one_line_with_the_json_it_meant(monkeypatch):
    line = _line(monkeypatch, DLSR_TRAINER__DETECTOR="n_blocks=8")
    assert line.startswith("invalid setting trainer.detector (env DLSR_TRAINER__DETECTOR) (got 'n_blocks=8')")
    assert '{"n_blocks": 8}' in line


@pytest.mark.parametrize("device", ["gpu", "cuda1", "cuda:x", "mps:0", ""])
def test_device_must_be_a_torch_device_we_support(monkeypatch, device):
    line = _line(monkeypatch, DLSR_MODEL__DEVICE=device)
    assert "model.device (env DLSR_MODEL__DEVICE)" in line and "cpu, cuda or cuda:N" in line


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_supported_devices_load(monkeypatch, device):
    monkeypatch.setenv("DLSR_MODEL__DEVICE", device)
    assert load_settings().model.device == device


def test_unknown_encoder_is_refused_with_close_names(monkeypatch):
    line = _line(monkeypatch, DLSR_MODEL__ENCODER="resnet999")
    assert "model.encoder (env DLSR_MODEL__ENCODER) (got 'resnet999')" in line
    assert "timm has no model 'resnet999'" in line and "resnet50" in line


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2.in1k", "test_efficientnet",
                                  "resnet50", "hf-hub:timm/anything"])  # fmt: skip
def test_known_encoders_load(monkeypatch, name):
    monkeypatch.setenv("DLSR_MODEL__ENCODER", name)
    assert load_settings().model.encoder == name


def test_encoder_check_does_not_import_torch_and_matches_timm():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dlsr_monitor.config import load_settings\n"
        "load_settings(model={'encoder': 'resnet50'})\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported at load'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import timm

    assert set(timm.list_models()) <= timm_model_names()
    assert check_model_name("tf_efficientnet_lite0") is None


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ("[1,9]", "within 0..4 for tf_efficientnet_lite0"),
        ("[0,5]", "within 0..4"),
        ("[-1,2]", "within 0..4"),
        ("[1,1,2]", "stage 1 listed more than once"),
        ("[]", "at least one feature stage"),
    ],
)
def test_stages_are_checked_for_range_and_duplicates(monkeypatch, stages, expected):
    line = _line(monkeypatch, DLSR_MODEL__STAGES=stages)
    assert "model.stages (env DLSR_MODEL__STAGES)" in line and expected in line


def test_stage_range_follows_the_encoder_family(monkeypatch):
    monkeypatch.setenv("DLSR_MODEL__ENCODER", "efficientnet_lite2")
    monkeypatch.setenv("DLSR_MODEL__STAGES", "[2,3,4]")
    assert load_settings().model.stages == (2, 3, 4)
    monkeypatch.setenv("DLSR_MODEL__ENCODER", "resnet50")  # not a family we know the stage count of
    monkeypatch.setenv("DLSR_MODEL__STAGES", "[1,6]")
    assert load_settings().model.stages == (1, 6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", "is empty"), ("  ", "is empty"), ("host:", "'host:' has no valid port"), ("a:1,,b:2", "empty entry"),
     ("h:99999", "no valid port"), (":9092", "has no host"), ("[::1", "not [ipv6]:port")],
)  # fmt: skip
def test_bootstrap_servers_must_be_host_port_entries(monkeypatch, value, expected):
    line = _line(monkeypatch, DLSR_KAFKA__BOOTSTRAP_SERVERS=value)
    assert "kafka.bootstrap_servers (env DLSR_KAFKA__BOOTSTRAP_SERVERS)" in line and expected in line


@pytest.mark.parametrize("value", ["kafka:9092", "kafka", "a:1, b:2", "[::1]:9092", "::1", "10.0.0.1:19092"])
def test_good_bootstrap_lists_load(monkeypatch, value):
    monkeypatch.setenv("DLSR_KAFKA__BOOTSTRAP_SERVERS", value)
    assert load_settings().kafka.bootstrap_servers == value


def test_errors_from_the_toml_file_name_the_file_not_an_env_var(tmp_path):
    (tmp_path / "dlsr.toml").write_text(
        '[model]\nalpha = 2\nalhpa = 1\n[kafka]\nbootstrap_servers = "host:"\n'
    )
    with pytest.raises(ValidationError) as info:
        load_settings()
    lines = settings_error_lines(info.value, Settings)
    assert len(lines) == 3
    by_field = {line.split(" ", 2)[1].rstrip(":"): line for line in lines}
    assert by_field["model.alpha"].startswith("dlsr.toml: model.alpha (got 2): Input should be less than 1")
    assert by_field["model.alhpa"].startswith("dlsr.toml: model.alhpa: unknown setting")
    assert by_field["kafka.bootstrap_servers"].startswith("dlsr.toml: kafka.bootstrap_servers (got 'host:')")
    assert not any("DLSR_" in line for line in lines)


def test_an_env_var_that_overrides_the_file_is_named_as_the_env_var(monkeypatch, tmp_path):
    cfg = tmp_path / "conf.toml"
    cfg.write_text("[model]\nalpha = 0.5\ndevice = 'gpu'\n")
    monkeypatch.setenv("DLSR_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("DLSR_MODEL__ALPHA", "3")
    with pytest.raises(ValidationError) as info:
        load_settings()
    lines = sorted(settings_error_lines(info.value, Settings))
    assert lines[0].startswith(f"{cfg}: model.device (got 'gpu')")
    assert lines[1].startswith("invalid setting model.alpha (env DLSR_MODEL__ALPHA) (got '3')")


def test_dotenv_values_are_named_as_env_vars(tmp_path):
    (tmp_path / "dlsr.toml").write_text("[model]\nalpha = 0.5\n")
    (tmp_path / ".env").write_text("DLSR_MODEL__ALPHA=7\n")
    with pytest.raises(ValidationError) as info:
        load_settings()
    (line,) = settings_error_lines(info.value, Settings)
    assert line.startswith("invalid setting model.alpha (env DLSR_MODEL__ALPHA) (got '7')")
