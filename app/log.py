"""structlog set-up shared by every process.

Logs go to stderr as JSON lines (console output when stderr is a terminal);
stdout is left to the echo handler, whose lines are the service's output.
Message bodies are never logged, only uuids.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(log_format: str = "auto", level: str = "info", process: str | None = None) -> None:
    console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    processors: list = [
        structlog.contextvars.merge_contextvars,
        _AddProcess(process),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not console:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (kazoo, uvicorn) come out as
    # the same JSON lines.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(
                record.levelno, record.getMessage(), logger=record.name, exc_info=record.exc_info
            )
        except Exception:
            self.handleError(record)


class _AddProcess:
    """Name the process on every line, including lines logged from kazoo's threads."""

    def __init__(self, process: str | None) -> None:
        self.process = process

    def __call__(self, logger: object, method: str, event: dict) -> dict:
        if self.process:
            event.setdefault("process", self.process)
        return event


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
