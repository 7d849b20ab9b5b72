"""``orchestratr server``, ``manager`` and ``web``: the long-running processes."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from orchestratr_core.backend_urls import DEFAULT_SQLITE_FILE, STORAGE_ENV
from orchestratr_core.cli.api import (
    describe,
    duration,
    given_value,
    non_negative_int,
    positive_int,
    storage_url,
    transport_url,
    use_signing_key,
)
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.manager import ManagerOptions, ServerManager
from orchestratr_core.placement import DEFAULT_KIND, parse_labels, validate_kind
from orchestratr_core.plugin.spec import CommandParents
from orchestratr_core.server import OrchestratedServer, ServerOptions

__all__ = ["add_commands", "load_job"]

log = logging.getLogger("orchestratr.cli")


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add this group's commands to the ``orchestratr`` parser."""
    server = commands.add_parser(
        "server",
        parents=[parents.common, parents.transport, parents.signing],
        help="run a server that takes jobs from the transport",
        description="Run jobs with the given job function until SIGTERM or Ctrl-C, then "
        "hand them back to the other servers.",
    )
    server.add_argument(
        "--job",
        required=True,
        action="append",
        metavar="[KIND=]MODULE:FUNCTION",
        help="a job function, e.g. orchestratr_core.examples:ticker (the default kind) or "
        "feed=pkg.feeds:follow (jobs of kind 'feed'); repeat it for each kind the server runs",
    )
    server.add_argument("--name", default="server", help="server name (need not be unique)")
    server.add_argument(
        "--max-workers",
        type=positive_int,
        default=10,
        metavar="K",
        help="most jobs run at once (default 10)",
    )
    server.add_argument(
        "--heartbeat-interval",
        type=duration,
        metavar="S",
        help="seconds between heartbeats to the manager (default 2)",
    )
    server.add_argument(
        "--stop-grace",
        type=duration,
        metavar="S",
        help="seconds a job has to honour its stop token before a hard stop (default 10)",
    )
    server.add_argument(
        "--move-after-failures",
        type=non_negative_int,
        metavar="N",
        help="after N failures in a row of a job here, hand it back so that another server "
        "takes its next start (default 3; 0: restart it here for ever)",
    )
    server.add_argument(
        "--avoid-for",
        type=duration,
        metavar="S",
        help="seconds a server hands back a job it moved away after failures (default 30)",
    )
    server.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here, and /healthz and /readyz (needs prometheus-client)",
    )
    server.add_argument("--otel", action="store_true", help="emit OpenTelemetry spans and metrics")
    server.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of this server, matched by jobs' --require (repeatable)",
    )
    server.add_argument(
        "--max-workers-per-kind",
        action="append",
        default=[],
        metavar="KIND=N",
        help="run at most N jobs of KIND at once (repeatable; within --max-workers)",
    )
    server.set_defaults(handler=_cmd_server)

    manager = commands.add_parser(
        "manager",
        parents=[parents.common, parents.storage, parents.transport, parents.signing],
        help="run a manager: publishes jobs, tracks servers, applies cancellations",
    )
    manager.add_argument(
        "--server-timeout",
        type=duration,
        metavar="S",
        help="a server not heard from for this long is dead (default 10)",
    )
    manager.add_argument(
        "--seen-batch",
        type=duration,
        metavar="S",
        help="an unchanged heartbeat's server row waits up to this long to be written "
        "with others' (0: each at once; default a twentieth of the server timeout, "
        "at most 0.5)",
    )
    manager.add_argument(
        "--backlog-wait",
        type=duration,
        metavar="S",
        help="while the manager has not applied the events waiting for it, declare no "
        "server dead for lack of a heartbeat still queued, for at most this long "
        "(0: judge by the wall clock; default six server timeouts)",
    )
    manager.add_argument(
        "--sweep-interval",
        type=duration,
        metavar="S",
        help="seconds between the leader's rounds: dead servers, outbox (default 1)",
    )
    manager.add_argument(
        "--leader-lease",
        type=duration,
        metavar="S",
        help="the leader's lease: another manager takes its duties over at most this long "
        "(plus one sweep) after it died or lost the database (default 10)",
    )
    manager.add_argument(
        "--rebalance-interval",
        type=duration,
        metavar="S",
        help="seconds between rebalancing rounds (default 5)",
    )
    manager.add_argument(
        "--confirm-hold-after",
        type=duration,
        metavar="S",
        help="confirm a pause (or quarantine) whose live server no longer runs the job but "
        "whose stop report was lost, this long after (default 30; above the servers' "
        "--stop-grace)",
    )
    manager.add_argument(
        "--update-ack-timeout",
        type=duration,
        metavar="S",
        help="restart a job updated in place whose running copy did not acknowledge the "
        "update this long after it (default 10; a few server heartbeat intervals)",
    )
    manager.add_argument(
        "--no-rebalance",
        dest="rebalance",
        action="store_false",
        default=None,
        help="never move running jobs to servers that join",
    )
    _web_arguments(manager, required=False)
    manager.add_argument("--otel", action="store_true", help="emit OpenTelemetry spans and metrics")
    manager.set_defaults(handler=_cmd_manager)

    web = commands.add_parser(
        "web",
        parents=[parents.common, parents.storage, parents.transport, parents.signing],
        help="serve the HTTP API and the live dashboard (needs orchestratr-core[web])",
        description="Serve the JSON API, its OpenAPI document at /api/openapi.json, the "
        "dashboard and /metrics. A bearer token (--api-token or $ORCHESTRATR_API_TOKEN) is "
        "required unless bound to loopback with no token set.",
    )
    _web_arguments(web, required=True)
    web.set_defaults(handler=_cmd_web)


def _web_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        default="127.0.0.1:8080" if required else None,
        help="serve the API and dashboard here" + (" (default 127.0.0.1:8080)" if required else ""),
    )
    parser.add_argument(
        "--api-token",
        metavar="TOKEN",
        help="bearer token for the API (default: $ORCHESTRATR_API_TOKEN); printable ASCII, "
        "16 characters or more",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        metavar="N",
        help="refuse API request bodies longer than N bytes with 413 (default 1048576)",
    )


# -- job loading -------------------------------------------------------------------------


def load_job(spec: str) -> Callable[..., Any]:
    """Import ``pkg.module:function`` (the attribute may be dotted) and return it.

    Raises :class:`ConfigurationError` with a one-line reason if the spec is
    malformed, the module cannot be imported, the attribute is missing or it is
    not callable. The working directory is importable, as for ``python -m``.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise ConfigurationError(
            f"--job must be MODULE:FUNCTION (e.g. orchestratr_core.examples:ticker), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"cannot import job module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing
        raise ConfigurationError(
            f"importing job module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"job module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ConfigurationError(f"job {spec!r} is a {type(target).__name__}, not a function")
    return cast("Callable[..., Any]", target)


def load_jobs(specs: list[str]) -> dict[str, Callable[..., Any]]:
    """``--job`` values as job functions by kind: ``KIND=MODULE:FUNCTION``, or
    ``MODULE:FUNCTION`` for the default kind. A kind given twice is an error."""
    jobs: dict[str, Callable[..., Any]] = {}
    for spec in specs:
        kind, sep, target = spec.partition("=")
        if not sep or ":" in kind:
            kind, target = DEFAULT_KIND, spec
        kind = validate_kind(kind.strip(), error=ConfigurationError)
        if kind in jobs:
            raise ConfigurationError(f"--job names kind {kind!r} twice")
        jobs[kind] = load_job(target)
    return jobs


def _kind_limits(specs: list[str]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for spec in specs:
        kind, sep, number = spec.partition("=")
        if not sep or not number.strip().isdigit():
            raise ConfigurationError(f"--max-workers-per-kind must be KIND=N, got {spec!r}")
        limits[kind.strip()] = int(number)
    return limits


async def _cmd_server(args: argparse.Namespace) -> int:
    use_signing_key(args)
    jobs = load_jobs(args.job)
    transport = transport_url(args)
    options = _options(
        ServerOptions(),
        heartbeat_interval=args.heartbeat_interval,
        stop_grace=args.stop_grace,
        move_after_failures=args.move_after_failures,
        avoid_for=args.avoid_for,
    )
    server = OrchestratedServer(
        jobs if set(jobs) != {DEFAULT_KIND} else jobs[DEFAULT_KIND],
        transport=transport,
        name=args.name,
        max_workers=args.max_workers,
        options=options,
        labels=parse_labels(args.label),
        max_workers_per_kind=_kind_limits(args.max_workers_per_kind),
    )
    log.info(
        "server %s (%s) starting: job %s, max %d workers, labels %s, transport %s, "
        "moves a job away after %d failures in a row (for %g s)",
        args.name,
        server.id,
        ", ".join(args.job),
        args.max_workers,
        ", ".join(args.label) or "none",
        describe(transport),
        options.move_after_failures,
        options.avoid_for,
    )
    if args.otel:
        from orchestratr_core.otel import install

        install()
    metrics = None
    if args.metrics:
        from orchestratr_core.health import HealthProbe
        from orchestratr_core.metrics import parse_listen_address, start_metrics_server

        probe = HealthProbe(asyncio.get_running_loop(), server.readiness)
        metrics = start_metrics_server(*parse_listen_address(args.metrics, 9464), probe=probe)
    try:
        await server.run_forever()
    finally:
        if metrics is not None:
            metrics.close()
    return 0


_Options = TypeVar("_Options", ServerOptions, ManagerOptions)


def _options(defaults: _Options, **given: Any) -> _Options:
    """``defaults`` with the options given on the command line (``None``: not given).
    The options class validates them (:class:`ConfigurationError`)."""
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})


async def _cmd_manager(args: argparse.Namespace) -> int:
    use_signing_key(args)
    storage = storage_url(args, must_exist=False)
    transport = transport_url(args)
    if given_value(args.storage, STORAGE_ENV) is None:
        print(f"storage: SQLite file {Path.cwd() / DEFAULT_SQLITE_FILE}", flush=True)
    options = _options(
        ManagerOptions(),
        server_timeout=args.server_timeout,
        seen_batch=args.seen_batch,
        backlog_wait=args.backlog_wait,
        sweep_interval=args.sweep_interval,
        leader_lease=args.leader_lease,
        rebalance_interval=args.rebalance_interval,
        rebalance=args.rebalance,
        confirm_hold_after=args.confirm_hold_after,
        update_ack_timeout=args.update_ack_timeout,
    )
    if args.http:
        from orchestratr_core.web import resolve_token

        resolve_token(args.api_token)  # a token that cannot work stops us before we start
    manager = ServerManager(storage=storage, transport=transport, options=options)
    log.info("manager starting: storage %s, transport %s", describe(storage), describe(transport))
    if args.otel:
        from orchestratr_core.otel import install

        install()
    if not args.http:
        await manager.run_forever()
        return 0
    from orchestratr_core.metrics import parse_listen_address
    from orchestratr_core.web import start_server

    host, port = parse_listen_address(args.http, 8080)
    await manager.start()
    web = await start_server(manager, host, port, args.api_token, **_web_options(args))
    try:
        await manager.run_forever()
    finally:
        await web.stop()
    return 0


def _web_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of the web app given on the command line."""
    return {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}


async def _cmd_web(args: argparse.Namespace) -> int:
    from orchestratr_core.metrics import parse_listen_address
    from orchestratr_core.web import run_web

    use_signing_key(args)
    storage = storage_url(args, must_exist=True)
    transport = transport_url(args)
    host, port = parse_listen_address(args.http, 8080)
    await run_web(storage, transport, host, port, args.api_token, **_web_options(args))
    return 0
