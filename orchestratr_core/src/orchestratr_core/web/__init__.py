"""The operator surface: a JSON HTTP API, a live dashboard and ``/metrics``.

Needs the ``web`` extra (``pip install 'orchestratr-core[web]'``: FastAPI,
uvicorn, prometheus-client); importing this package without them raises
:class:`~orchestratr_core.errors.MissingDriver`.

Typical use, inside a process that runs a manager::

    manager = ServerManager(storage="sqlite:///fleet.db", transport="amqp://...")
    await manager.start()
    await serve(manager, host="127.0.0.1", port=8080, token=None)

See ``docs/web.md`` for the API, the security rules and the metrics.
"""

from __future__ import annotations

import importlib.util

from orchestratr_core.errors import MissingDriver

for _module, _package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn")):
    if importlib.util.find_spec(_module) is None:
        raise MissingDriver("web", _package, "orchestratr-core[web]")

from orchestratr_core.web.app import WebBackend, create_app  # noqa: E402
from orchestratr_core.web.auth import TOKEN_ENV, AccessPolicy, is_loopback, resolve_token  # noqa: E402
from orchestratr_core.web.history import FleetHistory  # noqa: E402
from orchestratr_core.web.server import WebServer, run_web, serve, start_server  # noqa: E402

__all__ = [
    "TOKEN_ENV",
    "AccessPolicy",
    "FleetHistory",
    "WebBackend",
    "WebServer",
    "create_app",
    "is_loopback",
    "resolve_token",
    "run_web",
    "serve",
    "start_server",
]
