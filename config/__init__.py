"""Typed settings for DLSR Monitor, built once at the process edge and passed down."""

from dlsr_monitor.config.errors import ConfigFileError, StartupError, settings_error_lines
from dlsr_monitor.config.settings import (
    CONFIG_FILE_ENV,
    DashboardSettings,
    DemoSettings,
    KafkaSettings,
    ModelSettings,
    MonitorSettings,
    RedisSettings,
    Settings,
    TrainerSettings,
    load_settings,
)

__all__ = [
    "CONFIG_FILE_ENV",
    "ConfigFileError",
    "DashboardSettings",
    "DemoSettings",
    "KafkaSettings",
    "ModelSettings",
    "MonitorSettings",
    "RedisSettings",
    "Settings",
    "StartupError",
    "TrainerSettings",
    "load_settings",
    "settings_error_lines",
]
