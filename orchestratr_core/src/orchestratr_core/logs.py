"""Structured logs: ``key=value`` text or JSON lines, with the job's context.

:func:`configure_logging` installs one handler on the root logger. Every line
that concerns a job carries ``job_id``, ``server_id`` and ``fence`` fields,
taken, in this order, from:

1. ``extra={"job_id": ..., "server_id": ..., "fence": ...}`` on the log call;
2. the job context (:func:`job_context`): the :data:`observer` plugin sets it
   when the job starts, in the context the job's task is created in and no other
   (never in the server's delivery task), so everything the job function itself
   logs carries the fields too;
3. ``job_id=... fence=... server_id=...`` (or ``server=...``) written in the
   message text, as the runtime's log calls do; a missing ``server_id`` is then
   looked up among the jobs this process started.

Credentials never reach the output: every URL is shown as
:func:`~orchestratr_core.display.mask_url` shows it (password masked; a URL that
does not parse cleanly wholly hidden) and every value given to
:func:`add_secret` (the API token, say) is replaced by ``***``. Control
characters in a text field are escaped, so a log line cannot drive a terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any, Literal

from orchestratr_core.display import redact_urls
from orchestratr_core.plugin.spec import hookimpl

__all__ = [
    "JOB_FIELDS",
    "JobContextFilter",
    "JsonFormatter",
    "KeyValueFormatter",
    "LogObserver",
    "add_secret",
    "configure_logging",
    "current_job",
    "job_context",
    "observer",
    "redact",
]

JOB_FIELDS = ("job_id", "server_id", "fence")
"""The fields every job-related line carries (``None`` when unknown)."""

_JOB_ID = re.compile(r"\bjob_id=([^\s,;()]+)")
_FENCE = re.compile(r"\bfence=(\d+)")
_SERVER = re.compile(r"\bserver(?:_id)?=([^\s,;()]+)")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

_job: contextvars.ContextVar[tuple[str, str | None, int | None] | None] = contextvars.ContextVar(
    "orchestratr_job", default=None
)


def add_secret(value: str | None) -> None:
    """Never log ``value`` (replaced by ``***``). Values under 4 characters are
    ignored: masking them would garble ordinary words."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with URL passwords and registered secrets replaced by ``***``
    (see :func:`~orchestratr_core.display.redact_urls`)."""
    text = redact_urls(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def job_context(
    job_id: str, server_id: str | None = None, fence: int | None = None
) -> Iterator[None]:
    """Tag every log line written inside the block (and in tasks created in it)
    with this job's fields."""
    token = _job.set((job_id, server_id, fence))
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> tuple[str, str | None, int | None] | None:
    """``(job_id, server_id, fence)`` of the job context, if any."""
    return _job.get()


class LogObserver:
    """Observer plugin: sets the job context in the server's job task when a job
    starts, and remembers which server runs which job."""

    def __init__(self, remember: int = 10_000) -> None:
        self._owners: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    @hookimpl
    def orchestratr_job_started(
        self, server_id: str, job_id: str, name: str, fence: int, restarts: int
    ) -> None:
        """The hook runs right before the job function's task is created, inside
        the job's supervising task or, for a job started without one, in a context
        of its own (``contextvars.copy_context().run``): the context set here is
        inherited by the job's task and by nothing else."""
        _job.set((job_id, server_id, fence))
        with self._lock:
            self._owners[job_id] = (server_id, fence)
            self._owners.move_to_end(job_id)
            while len(self._owners) > self._remember:
                self._owners.popitem(last=False)

    def owner(self, job_id: str) -> tuple[str, int] | None:
        """``(server_id, fence)`` of the last start of ``job_id`` seen in this process."""
        with self._lock:
            return self._owners.get(job_id)


observer = LogObserver()
"""The process-wide log observer (registered by :func:`configure_logging`)."""


class JobContextFilter(logging.Filter):
    """Adds ``job_id``, ``server_id`` and ``fence`` attributes to every record
    (``None`` when the line is not about a job). See the module docstring."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Enrich ``record``; never drops it."""
        job_id = getattr(record, "job_id", None)
        server_id = getattr(record, "server_id", None)
        fence = getattr(record, "fence", None)
        context = _job.get()
        if job_id is None and context is not None:
            job_id, ctx_server, ctx_fence = context
            server_id = server_id if server_id is not None else ctx_server
            fence = fence if fence is not None else ctx_fence
        if job_id is None or fence is None or server_id is None:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):
                message = str(record.msg)
            if job_id is None and (m := _JOB_ID.search(message)):
                job_id = m.group(1)
            if job_id is not None:
                if fence is None and (m := _FENCE.search(message)):
                    fence = int(m.group(1))
                if server_id is None and (m := _SERVER.search(message)):
                    server_id = m.group(1)
                if (server_id is None or fence is None) and (known := observer.owner(str(job_id))):
                    server_id = server_id if server_id is not None else known[0]
                    fence = fence if fence is not None else known[1]
        record.job_id = job_id
        record.server_id = server_id
        record.fence = fence
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


# JSON escapes C0 controls itself; DEL and C1 (CSI is U+009B) it leaves raw.
_C1 = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or not text.isprintable() or any(c in text for c in ' "=\\'):
        return json.dumps(text, ensure_ascii=False).translate(_C1)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=... msg="..." job_id=... server_id=... fence=...``."""

    def format(self, record: logging.LogRecord) -> str:
        """One line per record (a traceback goes in an ``exc`` field)."""
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        if getattr(record, "job_id", None) is not None:
            parts.extend(f"{key}={_quote(getattr(record, key, None))}" for key in JOB_FIELDS)
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return redact(" ".join(parts))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the
    job fields (``null`` on lines not about a job) and ``exc`` for tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line per record."""
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in JOB_FIELDS:
            value = getattr(record, key, None)
            body[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            body["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(body, ensure_ascii=False, default=str)


def configure_logging(
    level: str | int = "info",
    fmt: Literal["text", "json"] = "text",
    *,
    stream: IO[str] | None = None,
    secrets: tuple[str, ...] = (),
    register_observer: bool = True,
) -> logging.Handler:
    """Send every log line to ``stream`` (default stderr) as ``key=value`` text
    or JSON lines, replacing the root logger's handlers.

    :param level: ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` or a number.
    :param fmt: ``"text"`` for ``key=value`` lines, ``"json"`` for JSON lines.
    :param secrets: values never to print (see :func:`add_secret`).
    :param register_observer: register :data:`observer` with the process-wide
        plugin manager so that job functions' own lines carry the job fields.
    :returns: the installed handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    for secret in secrets:
        add_secret(secret)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(JobContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if register_observer:
        from orchestratr_core.plugin.manager import get_plugin_manager

        manager = get_plugin_manager()
        if not manager.pluggy.is_registered(observer):
            manager.register(observer, name="logs")
    return handler
