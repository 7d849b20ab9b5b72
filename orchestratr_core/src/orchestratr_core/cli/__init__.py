"""The ``orchestratr`` command line: one module per command group under
:mod:`orchestratr_core.cli.cmd`, shared helpers in :mod:`orchestratr_core.cli.api`,
and the commands backend plugins add (``db`` comes from ``orchestratr-sql``).

Commands::

    orchestratr demo [--forever] [--storage URL]
    orchestratr server --job pkg.module:function [--name N] [--max-workers K] --transport URL
    orchestratr manager [--storage URL] --transport URL
    (server, manager, web and servers drain take --signing-key-file PATH: signed messages)
    orchestratr jobs create NAME [ARGUMENT] | cancel ID | list [filters] | show ID
    orchestratr servers list [--all] | drain ID
    orchestratr plugins
    orchestratr db upgrade | status          (from orchestratr-sql)

Storage and transport come from ``--storage`` / ``--transport``, else from the
environment variables ``ORCHESTRATR_STORAGE`` / ``ORCHESTRATR_TRANSPORT``; with
neither, the storage is the SQLite file ``./orchestratr.sqlite3``.

Every error is one line on standard error and exit status 2 (bad usage or a
value that cannot work) or 1 (a failure at run time); 130 after Ctrl-C. URLs are
shown with their password masked, and error messages are scrubbed of every
password the command was given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from orchestratr_core.backend_urls import (
    DEFAULT_SQLITE_FILE,
    STORAGE_ENV,
    TRANSPORT_ENV,
    sqlite_url,
)
from orchestratr_core.cli.api import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    PROG,
    secret_of,
)
from orchestratr_core.cli.cmd.run import load_job
from orchestratr_core.cli.parser import build_parser
from orchestratr_core.display import printable
from orchestratr_core.errors import (
    ConfigurationError,
    InvalidJobInput,
    OrchestratrError,
    PluginNotFound,
)
from orchestratr_core.logs import configure_logging, redact
from orchestratr_core.plugin.manager import get_plugin_manager

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "STORAGE_ENV",
    "TRANSPORT_ENV",
    "build_parser",
    "load_job",
    "main",
    "sqlite_url",
]

log = logging.getLogger("orchestratr.cli")


def _default_level(command: str) -> str:
    if command in ("server", "manager"):
        return "info"
    # The demo checks and reports what it shows; log lines would only interleave.
    return "error" if command == "demo" else "warning"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {printable(redact(message))}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``orchestratr`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("storage", "transport"):
        secret_of(getattr(args, name, None))
    secret_of(os.environ.get(STORAGE_ENV))
    secret_of(os.environ.get(TRANSPORT_ENV))
    configure_logging(args.log_level or _default_level(args.command), args.log_format)
    get_plugin_manager().load_extensions()
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (ConfigurationError, InvalidJobInput, PluginNotFound) as exc:
        log.debug("usage error", exc_info=True)
        return _fail(str(exc), EXIT_USAGE)
    except (OrchestratrError, OSError) as exc:
        log.debug("runtime error", exc_info=True)
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, OrchestratrError):
            text = f"{type(exc).__name__}: {text}" if str(exc) else text
        return _fail(text, EXIT_RUNTIME)
    except Exception as exc:  # never a traceback for a person; --log-level debug shows it
        log.debug("unexpected error", exc_info=True)
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (run with --log-level debug for details)",
            EXIT_RUNTIME,
        )
