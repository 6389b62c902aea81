"""Typed settings for DLSR Monitor, built once at the process edge and passed down."""

from config.settings import (
    KafkaSettings,
    ModelSettings,
    MonitorSettings,
    RedisSettings,
    Settings,
    TrainerSettings,
)

__all__ = ["KafkaSettings", "ModelSettings", "MonitorSettings", "RedisSettings", "Settings", "TrainerSettings"]
