"""Logging with the request id on every line.

The id travels between services in the `x-request-id` metadata; the handler decorators in
`services.common.errors` bind it, so any log line written while serving a request names it.
"""

from __future__ import annotations

import contextvars
import logging
import sys

QUIET_AT_INFO = ("httpx",)
"""Libraries whose INFO lines are one per call: shown only when the level is DEBUG."""

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def bind_request_id(request_id: str) -> None:
    """Names the request the current task serves, for its log lines."""
    _request_id.set(request_id or "-")


def current_request_id() -> str:
    """The id bound by `bind_request_id` in this task, or "-"."""
    return _request_id.get()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


def configure(service: str, level: str) -> None:
    """Sends the process's logs to stderr as `time level service request-id logger: message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {service} %(request_id)s %(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request it sends at INFO: a line per provider call, without the
    # request id, at a cost of about 3% of the executor's CPU. Its lines show at DEBUG.
    quiet = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    for name in QUIET_AT_INFO:
        logging.getLogger(name).setLevel(quiet)
