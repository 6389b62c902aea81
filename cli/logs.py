"""One place where commands set up logging: `configure_logging(settings, level)`.

`settings.log.format` (env `DLSR_LOG__FORMAT`) picks the output on stderr:

- `text` (default): `2025-01-01 12:00:00,123 INFO dlsr_monitor.monitor.service: message`, exactly the format the
  commands always printed;
- `json`: one JSON object per line (python-json-logger): `time` (ISO-8601, UTC), `level`, `logger`, `message`,
  `instance` (the monitor's `monitor.instance_id`, else `hostname-pid`), any `extra={...}` the call passes (the
  services pass `source`), and `exc_info` with the traceback when there is one. Python warnings are routed
  through logging too, so every stderr line of a service is JSON.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import LogSettings, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_instance() -> str:
    """`hostname-pid`: the instance name of a process that has no configured one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def make_formatter(log: LogSettings, *, instance: str | None = None) -> logging.Formatter:
    """The formatter `log.format` asks for (text: the classic one line; json: one object per line)."""
    if log.format == "text":
        return logging.Formatter(TEXT_FORMAT)
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"instance": instance or default_instance()},
        timestamp="time",
    )


def make_handler(
    log: LogSettings, *, instance: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """A stderr (or `stream`) handler with the configured formatter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(log, instance=instance))
    return handler


def configure_logging(settings: Settings, level: str = "INFO", *, instance: str | None = None) -> None:
    """Set up the root logger for a command (like `logging.basicConfig`: a no-op when it already has handlers).

    `instance` names the process in JSON lines (the monitor passes its instance id; default `hostname-pid`).
    kafka-python's own loggers are silenced: they log every reconnect, and the services report outages themselves.
    """
    handler = make_handler(settings.log, instance=instance)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    if settings.log.format == "json":
        logging.captureWarnings(True)  # a warnings.warn would otherwise be a bare, non-JSON stderr line
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
