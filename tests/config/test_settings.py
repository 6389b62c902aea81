"""Settings: env nesting, .env, TOML, validation of security fields."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from dlsr_monitor.config import ConfigFileError, Settings, load_settings
from dlsr_monitor.config.settings import KafkaSettings, RedisSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    # Settings read the process environment and the working directory: isolate both.
    import os

    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_build_without_any_configuration():
    s = Settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.redis.url.startswith("redis://")
    assert 0 < s.model.alpha < 1


def test_env_prefix_and_nested_delimiter(monkeypatch):
    monkeypatch.setenv("DLSR_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("DLSR_MODEL__ALPHA", "0.05")
    monkeypatch.setenv("DLSR_DASHBOARD__REFRESH_S", "2.5")
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.model.alpha == 0.05
    assert s.dashboard.refresh_s == 2.5


def test_dotenv_file_is_read_and_env_wins(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("DLSR_REDIS__PREFIX=fromdotenv\nDLSR_KAFKA__CLIENT_ID=dotenv\n")
    monkeypatch.setenv("DLSR_KAFKA__CLIENT_ID", "fromenv")
    s = Settings()
    assert s.redis.prefix == "fromdotenv"
    assert s.kafka.client_id == "fromenv"


def test_toml_file_named_by_env_is_lowest_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "conf.toml"
    cfg.write_text('[model]\nalpha = 0.02\n[redis]\nprefix = "toml"\n')
    monkeypatch.setenv("DLSR_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("DLSR_REDIS__PREFIX", "env")
    s = load_settings()
    assert s.model.alpha == 0.02
    assert s.redis.prefix == "env"


def test_default_toml_in_working_directory(tmp_path):
    (tmp_path / "dlsr.toml").write_text("[trainer]\nmin_new_vetted = 7\n")
    assert load_settings().trainer.min_new_vetted == 7


def test_missing_named_config_file_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DLSR_CONFIG_FILE", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigFileError, match="DLSR_CONFIG_FILE=.*nope.toml: no such file"):
        load_settings()


def test_malformed_toml_names_the_file_and_line(monkeypatch, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nalpha = 0.05\n[kafka\n")
    monkeypatch.setenv("DLSR_CONFIG_FILE", str(cfg))
    with pytest.raises(ConfigFileError) as info:
        load_settings()
    msg = str(info.value)
    assert "bad.toml" in msg and "line 3" in msg and "\n" not in msg


def test_sasl_protocol_requires_a_mechanism():
    with pytest.raises(ValidationError, match="needs a mechanism"):
        KafkaSettings(security_protocol="SASL_SSL")
    k = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    kw = k.client_kwargs()
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == "p"
    assert kw["security_protocol"] == "SASL_SSL"


def test_kafka_tls_files_reach_the_client(tmp_path):
    k = KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "ca.pem")
    assert k.client_kwargs()["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert k.client_kwargs()["bootstrap_servers"] == ["127.0.0.1:9092"]


def test_redis_auth_and_tls():
    r = RedisSettings(url="rediss://cache:6380/1", username="app", password="s3cret", ssl_ca_certs="/ca.pem")
    assert r.client_kwargs() == {
        "username": "app", "password": "s3cret", "ssl_ca_certs": "/ca.pem", "socket_timeout": 10.0
    }
    assert isinstance(r.password, SecretStr) and "s3cret" not in repr(r)
    with pytest.raises(ValidationError, match="redis://"):
        RedisSettings(url="http://cache:6379")


def test_unknown_keys_are_refused_in_every_section(monkeypatch):
    for name in ("DLSR_KAFKA__BOGUS", "DLSR_MODEL__ALHPA", "DLSR_MONITOR__NOPE", "DLSR_TRAINER__NOPE"):
        monkeypatch.setenv(name, "1")
        with pytest.raises(ValidationError, match="xtra inputs are not permitted"):
            Settings()
        monkeypatch.delenv(name)


def test_trainer_detector_arguments_must_fit_the_detector_kind(monkeypatch):
    from dlsr_monitor.config.errors import settings_error_lines

    monkeypatch.setenv("DLSR_MODEL__DETECTOR", "mahalanobis")
    monkeypatch.setenv("DLSR_TRAINER__DETECTOR", '{"n_blocks": 8, "shrinkage": 0.1}')
    with pytest.raises(ValidationError) as info:
        Settings()
    (line,) = settings_error_lines(info.value, Settings)
    assert line.startswith("invalid setting trainer.detector (env DLSR_TRAINER__DETECTOR): n_blocks is not")
    assert "'mahalanobis'" in line and "shrinkage" in line
    monkeypatch.setenv("DLSR_TRAINER__DETECTOR", '{"shrinkage": 0.1}')
    assert Settings().trainer.detector == {"shrinkage": 0.1}


def test_detector_argument_table_matches_the_dlsr_classes():
    from dlsr.base import detector_class, detector_kinds
    from dlsr_monitor.config.settings import DETECTOR_ARGUMENTS

    # The arguments a detector saves as hyperparameters, which it takes back as keywords; the trainer passes
    # encoder, device, boundaries and progress itself.
    assert sorted(DETECTOR_ARGUMENTS) == list(detector_kinds())
    for kind, names in DETECTOR_ARGUMENTS.items():
        cls = detector_class(kind)
        taken = cls().hyperparameters()
        assert list(names) == list(taken), kind
        assert cls(**taken).hyperparameters() == taken, kind


def test_model_precision_is_checked(monkeypatch):
    assert Settings().model.precision == "auto"
    monkeypatch.setenv("DLSR_MODEL__PRECISION", "fp16")
    with pytest.raises(ValidationError, match="precision"):
        Settings()


# -- CPU-sized defaults: the LFDN, the input size and the threads resolve from what the fit / host has -------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cpu", {"n_blocks": 8, "width": "D", "epochs": 20}),
        ("cuda", {"n_blocks": 16, "width": "2D", "epochs": 150}),
        ("cuda:1", {"n_blocks": 16, "width": "2D", "epochs": 150}),
    ],
)
def test_lfdn_defaults_per_device(device, expected):
    from dlsr_monitor.config.settings import lfdn_defaults

    assert lfdn_defaults(device) == expected


def test_lfdn_defaults_refuse_an_unresolved_device():
    from dlsr_monitor.config.settings import lfdn_defaults

    with pytest.raises(ValueError, match="resolve the device first"):
        lfdn_defaults("auto")


def test_auto_lfdn_resolves_from_the_device_the_fit_runs_on():
    model = Settings().model
    assert (model.n_blocks, model.width, model.epochs) == ("auto", "auto", "auto")
    cpu = model.detector_kwargs(device="cpu", dim=512)
    assert (cpu["n_blocks"], cpu["width"], cpu["epochs"]) == (8, 512, 20)  # width D: the feature width
    gpu = model.detector_kwargs(device="cuda:0", dim=512)
    assert (gpu["n_blocks"], gpu["width"], gpu["epochs"]) == (16, None, 150)  # None: the detector's 2D
    with pytest.raises(ValueError, match="pass dim"):
        model.detector_kwargs(device="cpu")


def test_env_values_win_over_auto_on_every_device(monkeypatch):
    monkeypatch.setenv("DLSR_MODEL__N_BLOCKS", "16")
    monkeypatch.setenv("DLSR_MODEL__WIDTH", "2D")
    monkeypatch.setenv("DLSR_MODEL__EPOCHS", "3")
    model = Settings().model
    for device in ("cpu", "cuda"):
        kw = model.detector_kwargs(device=device, dim=512)
        assert (kw["n_blocks"], kw["width"], kw["epochs"]) == (16, None, 3)
    monkeypatch.setenv("DLSR_MODEL__WIDTH", "96")
    monkeypatch.setenv("DLSR_MODEL__EPOCHS", "0")
    kw = Settings().model.detector_kwargs(device="cuda", dim=512)
    assert (kw["width"], kw["epochs"]) == (96, 0)


@pytest.mark.parametrize(("name", "value"), [("N_BLOCKS", "0"), ("N_BLOCKS", "big"), ("WIDTH", "3D"), ("EPOCHS", "-1")])
def test_lfdn_size_refuses_nonsense(monkeypatch, name, value):
    monkeypatch.setenv(f"DLSR_MODEL__{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_input_size_auto_by_default_and_a_number_wins(monkeypatch):
    model = Settings().model
    assert model.input_size == "auto"
    assert model.encoder_kwargs()["input_size"] is None  # nothing resolved yet: the backbone's own size
    assert model.encoder_kwargs(input_size=128)["input_size"] == 128
    monkeypatch.setenv("DLSR_MODEL__INPUT_SIZE", "96")
    model = Settings().model
    assert model.input_size == 96 and model.encoder_kwargs(input_size=128)["input_size"] == 96


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_thread_split_never_oversubscribes(cores):
    from dlsr_monitor.config.settings import thread_split

    runtime, decode = thread_split(cores)
    assert runtime >= 1 and decode >= 1
    assert runtime + decode <= max(cores, 2)  # one core still needs one of each
    assert decode <= runtime  # decoding is the smaller share of the work


def test_thread_split_values():
    from dlsr_monitor.config.settings import thread_split

    assert [thread_split(c) for c in (1, 2, 4, 8, 16)] == [(1, 1), (1, 1), (3, 1), (6, 2), (12, 4)]


def test_thread_defaults_follow_the_cpu_affinity_and_env_wins(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    s = Settings()
    assert (s.model.runtime_threads, s.monitor.decode_threads) == (6, 2)
    monkeypatch.setenv("DLSR_MONITOR__DECODE_THREADS", "3")
    monkeypatch.setenv("DLSR_MODEL__RUNTIME_THREADS", "4")
    s = Settings()
    assert (s.model.runtime_threads, s.monitor.decode_threads) == (4, 3)


def test_calibration_guarantee_settings(monkeypatch):
    s = Settings()
    # The product's default is pac at delta 0.1 (the library's calibrate() stays marginal); no drift factor.
    assert (s.model.calibration, s.model.delta, s.monitor.drift_null_factor) == ("pac", 0.1, None)
    monkeypatch.setenv("DLSR_MODEL__CALIBRATION", "marginal")
    monkeypatch.setenv("DLSR_MODEL__DELTA", "0.05")
    monkeypatch.setenv("DLSR_MONITOR__DRIFT_NULL_FACTOR", "2")
    s = Settings()
    assert (s.model.calibration, s.model.delta, s.monitor.drift_null_factor) == ("marginal", 0.05, 2.0)
    for name, value, field in [("DLSR_MODEL__CALIBRATION", "conditional", "calibration"),
                               ("DLSR_MODEL__DELTA", "0", "delta"), ("DLSR_MODEL__DELTA", "1.5", "delta"),
                               ("DLSR_MONITOR__DRIFT_NULL_FACTOR", "0.5", "drift_null_factor")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=field):
            Settings()
        monkeypatch.delenv(name)
