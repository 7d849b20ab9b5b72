"""What every command of the ``orchestratr`` CLI uses, including the commands a
backend plugin contributes (:func:`orchestratr_core.plugin.spec.orchestratr_cli_commands`):
exit statuses, argument types, the storage and transport a command was given, and
output for people (tables) and scripts (JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from orchestratr_core.backend_urls import (
    DEFAULT_SQLITE_FILE,
    STORAGE_ENV,
    TRANSPORT_ENV,
    sqlite_url,
)
from orchestratr_core.display import mask_url, printable, url_secrets
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.job import MAX_COUNT, MAX_DURATION, split_fence
from orchestratr_core.logs import add_secret, redact
from orchestratr_core.plugin.manager import get_plugin_manager
from orchestratr_core.signing import KEY_FILE_ENV, load_signer

if TYPE_CHECKING:
    from orchestratr_core.storage import Storage

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "PROG",
    "OpenStorage",
    "Parser",
    "ago",
    "cell",
    "describe",
    "duration",
    "fence_label",
    "given_value",
    "non_negative_int",
    "plain",
    "positive_int",
    "print_json",
    "secret_of",
    "short",
    "storage_url",
    "table",
    "transport_url",
    "use_signing_key",
]

EXIT_RUNTIME = 1
"""Exit status of a failure at run time (unreachable backend, unknown job, ...)."""
EXIT_USAGE = 2
"""Exit status of bad usage or a value that cannot work (unknown plugin, bad name, ...)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C."""

PROG = "orchestratr"
"""The command's name in messages."""
_log = logging.getLogger("orchestratr.cli")


# -- credentials ---------------------------------------------------------------------


def secret_of(url: str | None) -> None:
    """Never print the password of a URL this process was given (drivers sometimes
    repeat a password without its URL); a URL that does not parse cleanly is
    secret as a whole (:func:`~orchestratr_core.display.url_secrets`)."""
    for secret in url_secrets(url):
        add_secret(secret)


# -- argument parsing ------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # The message may quote an argument, and an argument may be a URL with a password.
        message = redact(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """An argparse type: a count within 1..MAX_COUNT."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be within 1..{MAX_COUNT}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a count within 0..MAX_COUNT (``0`` usually turns a feature off)."""
    return 0 if text.strip() == "0" else positive_int(text)


def duration(text: str) -> float:
    """An argparse type: seconds within 0..MAX_DURATION."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"expected seconds within 0..{MAX_DURATION:.0f}, got {text!r}"
        )
    return value


# -- backends --------------------------------------------------------------------------


def given_value(value: str | None, env: str) -> str | None:
    """The flag's value, else the environment variable's, else None."""
    if value is not None and value.strip():
        return value.strip()
    from_env = os.environ.get(env, "").strip()
    return from_env or None


def storage_url(args: argparse.Namespace, *, must_exist: bool) -> str:
    """The storage to use: flag, environment, else the SQLite file in the
    working directory. With ``must_exist``, a missing default file is an error
    (a listing must not silently create an empty database)."""
    given = given_value(getattr(args, "storage", None), STORAGE_ENV)
    if given is not None:
        return given
    path = Path.cwd() / DEFAULT_SQLITE_FILE
    if must_exist and not path.exists():
        raise ConfigurationError(
            f"no storage given and {path} does not exist: pass --storage URL or set "
            f"{STORAGE_ENV} (or run 'orchestratr manager' in this directory first)"
        )
    return sqlite_url(path)


def transport_url(args: argparse.Namespace) -> str:
    """The transport to use: flag, else environment; neither is an error."""
    given = given_value(getattr(args, "transport", None), TRANSPORT_ENV)
    if given is None:
        raise ConfigurationError(
            f"no transport given: pass --transport URL or set {TRANSPORT_ENV} "
            "(e.g. amqp://guest:guest@localhost:5672/)"
        )
    return given


def describe(url: str) -> str:
    """A storage or transport for display: its URL with the password masked."""
    return str(mask_url(url))


class OpenStorage:
    """``async with OpenStorage(url) as storage``: build, open and always close."""

    def __init__(self, url: str) -> None:
        self._storage = get_plugin_manager().make_storage(url)

    async def __aenter__(self) -> Storage:
        try:
            await self._storage.open()
        except BaseException:
            await self._storage.close()  # release whatever a half-open left behind
            raise
        return self._storage

    async def __aexit__(self, *exc: object) -> None:
        await self._storage.close()


def use_signing_key(args: argparse.Namespace) -> None:
    """Check the key file now (a clear error, not one deep in a transport) and hand
    it to the transports this process builds, through the environment they read."""
    path = getattr(args, "signing_key_file", None)
    signer = load_signer(path)
    if path:
        os.environ[KEY_FILE_ENV] = str(Path(path).resolve())
    if signer is not None:
        _log.info("messages are signed with key %s", ", accepted: ".join(signer.key_ids))


# -- output ------------------------------------------------------------------------------


_C1_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def print_json(value: object) -> None:
    """Print ``value`` as indented JSON for scripts."""
    # Still exact JSON: DEL and C1 controls (which JSON leaves raw) become \u escapes.
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str).translate(_C1_ESCAPES))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table; ``None`` cells show as ``-``."""
    # Cells hold stored text (job names, errors, server hosts): escape its control characters.
    cells = [
        [str(h) for h in headers],
        *[["-" if c is None else printable(str(c)) for c in r] for r in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def ago(when: datetime | None) -> str:
    """A time for a person: how long ago."""
    if when is None:
        return "-"
    seconds = (datetime.now(UTC) - when).total_seconds()
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def fence_label(fence: int) -> str:
    """A fence with its generation and delivery count."""
    generation, deliveries = split_fence(fence)
    return f"{fence} ({generation}.{deliveries})" if fence else "0"


def short(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters."""
    return text if len(text) <= width else text[: width - 3] + "..."


def plain(value: object) -> object:
    """Turn what a backend returned into JSON-ready data."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def cell(value: object) -> str:
    """A value for a person: lists joined, ``None`` as ``-``, booleans as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "none"
    return str(value)
