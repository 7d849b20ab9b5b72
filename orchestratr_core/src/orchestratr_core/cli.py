"""The ``orchestratr`` command line.

Commands::

    orchestratr demo [--forever] [--storage URL]
    orchestratr server --job pkg.module:function [--name N] [--max-workers K] --transport URL
    orchestratr manager [--storage URL] --transport URL
    (server, manager, web and servers drain take --signing-key-file PATH: signed messages)
    orchestratr jobs create NAME [ARGUMENT] | cancel ID | list [filters] | show ID
    orchestratr servers list [--all] | drain ID
    orchestratr plugins
    orchestratr db upgrade | status

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
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from orchestratr_core.client import OrchestratorClient
from orchestratr_core.display import mask_url, printable, url_secrets
from orchestratr_core.errors import (
    ConfigurationError,
    InvalidJobInput,
    MissingDriver,
    OrchestratrError,
    PluginNotFound,
)
from orchestratr_core.job import (
    MAX_COUNT,
    MAX_DURATION,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    split_fence,
    statuses_of,
    validate_argument,
    validate_name,
)
from orchestratr_core.logs import add_secret, configure_logging, redact
from orchestratr_core.manager import ManagerOptions, ServerManager
from orchestratr_core.monitor import OrchestratorMonitor
from orchestratr_core.plugin.manager import BLOCK_ENV, get_plugin_manager
from orchestratr_core.server import OrchestratedServer, ServerOptions
from orchestratr_core.signing import KEY_ENV, KEY_FILE_ENV, load_signer

if TYPE_CHECKING:
    from orchestratr_core.storage import Storage

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

STORAGE_ENV = "ORCHESTRATR_STORAGE"
"""Environment variable holding the storage (plugin name or URL)."""
TRANSPORT_ENV = "ORCHESTRATR_TRANSPORT"
"""Environment variable holding the transport (plugin name or URL)."""
DEFAULT_SQLITE_FILE = "orchestratr.sqlite3"
"""The embedded default storage: this file in the working directory."""

EXIT_RUNTIME = 1
"""Exit status of a failure at run time (unreachable backend, unknown job, ...)."""
EXIT_USAGE = 2
"""Exit status of bad usage or a value that cannot work (unknown plugin, bad name, ...)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C."""

PROG = "orchestratr"
log = logging.getLogger("orchestratr.cli")


# -- credentials ---------------------------------------------------------------------


def _secret_of(url: str | None) -> None:
    """Never print the password of a URL this process was given (drivers sometimes
    repeat a password without its URL); a URL that does not parse cleanly is
    secret as a whole (:func:`~orchestratr_core.display.url_secrets`)."""
    for secret in url_secrets(url):
        add_secret(secret)


# -- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # The message may quote an argument, and an argument may be a URL with a password.
        message = redact(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be within 1..{MAX_COUNT}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"expected seconds within 0..{MAX_DURATION:.0f}, got {text!r}"
        )
    return value


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
        type=_positive_int,
        metavar="N",
        help="refuse API request bodies longer than N bytes with 413 (default 1048576)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``orchestratr`` command."""
    # Options every command accepts, before or after its name. SUPPRESS keeps a
    # sub-command's default from overwriting a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="log level (default: info for server and manager, warning otherwise)",
    )
    common.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=argparse.SUPPRESS,
        help="log line format on standard error (default: text)",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print JSON for scripts instead of a table"
    )
    storage = _Parser(add_help=False)
    storage.add_argument(
        "--storage",
        metavar="URL",
        help=f"storage plugin name or URL (default: ${STORAGE_ENV}, else sqlite file "
        f"./{DEFAULT_SQLITE_FILE})",
    )
    transport = _Parser(add_help=False)
    transport.add_argument(
        "--transport",
        metavar="URL",
        help=f"transport plugin name or URL (default: ${TRANSPORT_ENV})",
    )
    signing = _Parser(add_help=False)
    signing.add_argument(
        "--signing-key-file",
        metavar="PATH",
        help="sign every message and accept only signed ones: a file with the fleet's "
        f"key, and optionally the previous one (default: ${KEY_FILE_ENV}, else ${KEY_ENV})",
    )

    parser = _Parser(
        prog=PROG,
        description="OrchestratR: run infinite jobs across a fleet of servers, "
        "once each, moving them when a server dies.",
        epilog="Run 'orchestratr COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level", type=str.lower, choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run a manager and three servers in this process and show what happens",
        description="One process, no services: a manager, three servers on the memory "
        "transport and 30 jobs; kills a server, cancels a job, shows the result. Its "
        "storage is the SQLite file ./orchestratr-demo.sqlite3 (made anew each run) "
        "unless --storage says otherwise.",
    )
    demo.add_argument("--storage", metavar="URL", help="storage for the demo (e.g. memory)")
    demo.add_argument(
        "--forever", action="store_true", help="keep running after the script until Ctrl-C"
    )
    demo.set_defaults(handler=_cmd_demo)

    server = commands.add_parser(
        "server",
        parents=[common, transport, signing],
        help="run a server that takes jobs from the transport",
        description="Run jobs with the given job function until SIGTERM or Ctrl-C, then "
        "hand them back to the other servers.",
    )
    server.add_argument(
        "--job",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the job function, e.g. orchestratr_core.examples:ticker",
    )
    server.add_argument("--name", default="server", help="server name (need not be unique)")
    server.add_argument(
        "--max-workers",
        type=_positive_int,
        default=10,
        metavar="K",
        help="most jobs run at once (default 10)",
    )
    server.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        metavar="S",
        help="seconds between heartbeats to the manager (default 2)",
    )
    server.add_argument(
        "--stop-grace",
        type=_seconds,
        metavar="S",
        help="seconds a job has to honour its stop token before a hard stop (default 10)",
    )
    server.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (needs prometheus-client)",
    )
    server.add_argument("--otel", action="store_true", help="emit OpenTelemetry spans and metrics")
    server.set_defaults(handler=_cmd_server)

    manager = commands.add_parser(
        "manager",
        parents=[common, storage, transport, signing],
        help="run a manager: publishes jobs, tracks servers, applies cancellations",
    )
    manager.add_argument(
        "--server-timeout",
        type=_seconds,
        metavar="S",
        help="a server not heard from for this long is dead (default 10)",
    )
    manager.add_argument(
        "--sweep-interval",
        type=_seconds,
        metavar="S",
        help="seconds between the leader's rounds: dead servers, outbox (default 1)",
    )
    manager.add_argument(
        "--rebalance-interval",
        type=_seconds,
        metavar="S",
        help="seconds between rebalancing rounds (default 5)",
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
        parents=[common, storage, transport, signing],
        help="serve the HTTP API and the live dashboard (needs orchestratr-core[web])",
        description="Serve the JSON API, its OpenAPI document at /api/openapi.json, the "
        "dashboard and /metrics. A bearer token (--api-token or $ORCHESTRATR_API_TOKEN) is "
        "required unless bound to loopback with no token set.",
    )
    _web_arguments(web, required=True)
    web.set_defaults(handler=_cmd_web)

    jobs = commands.add_parser("jobs", parents=[common], help="create, cancel and list jobs")
    job_commands = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    create = job_commands.add_parser(
        "create",
        parents=[common, storage, as_json],
        help="create a job (a running manager publishes it)",
    )
    create.add_argument("name", help="the job's name, unique among jobs not deleted")
    create.add_argument("argument", nargs="?", default="", help="the job's argument string")
    create.set_defaults(handler=_cmd_jobs_create)
    cancel = job_commands.add_parser(
        "cancel", parents=[common, storage, as_json], help="cancel a job for good"
    )
    cancel.add_argument("id", help="job id")
    cancel.set_defaults(handler=_cmd_jobs_cancel)
    listing = job_commands.add_parser(
        "list", parents=[common, storage, as_json], help="list jobs (paged)"
    )
    listing.add_argument(
        "--status",
        action="extend",
        nargs="+",
        default=[],
        metavar="S",
        help="only these statuses: " + ", ".join(s.value for s in JobStatus),
    )
    listing.add_argument("--server", metavar="ID", help="only jobs on this server")
    listing.add_argument("--name-prefix", metavar="P", help="only names starting with P")
    listing.add_argument("--include-deleted", action="store_true", help="list deleted jobs too")
    listing.add_argument(
        "--limit", type=_positive_int, default=100, metavar="N", help="page size (default 100)"
    )
    listing.add_argument("--after", metavar="CURSOR", help="the next_cursor of the last page")
    listing.set_defaults(handler=_cmd_jobs_list)
    show = job_commands.add_parser("show", parents=[common, storage, as_json], help="show one job")
    show.add_argument("id", help="job id")
    show.set_defaults(handler=_cmd_jobs_show)

    servers = commands.add_parser("servers", parents=[common], help="list and drain servers")
    server_commands = servers.add_subparsers(
        dest="servers_command", metavar="SERVERS_COMMAND", required=True
    )
    servers_list = server_commands.add_parser(
        "list", parents=[common, storage, as_json], help="list live servers and their jobs"
    )
    servers_list.add_argument(
        "--all", action="store_true", help="include servers that died or left"
    )
    servers_list.set_defaults(handler=_cmd_servers_list)
    drain = server_commands.add_parser(
        "drain",
        parents=[common, storage, transport, signing],
        help="tell a server to hand its jobs back and exit",
    )
    drain.add_argument("id", help="server id")
    drain.set_defaults(handler=_cmd_servers_drain)

    plugins = commands.add_parser(
        "plugins", parents=[common, as_json], help="list installed backend plugins"
    )
    plugins.set_defaults(handler=_cmd_plugins)

    db = commands.add_parser("db", parents=[common], help="SQL schema migrations")
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", parents=[common, storage], help="apply pending schema migrations"
    )
    upgrade.set_defaults(handler=_cmd_db_upgrade)
    status = db_commands.add_parser(
        "status", parents=[common, storage, as_json], help="show the schema version"
    )
    status.set_defaults(handler=_cmd_db_status)
    return parser


def _version() -> str:
    from orchestratr_core import __version__

    return __version__


# -- backends --------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    """The storage URL of a SQLite file (``sqlite:///`` followed by the absolute path)."""
    return "sqlite:///" + str(path.resolve())


def _given(value: str | None, env: str) -> str | None:
    """The flag's value, else the environment variable's, else None."""
    if value is not None and value.strip():
        return value.strip()
    from_env = os.environ.get(env, "").strip()
    return from_env or None


def _storage_url(args: argparse.Namespace, *, must_exist: bool) -> str:
    """The storage to use: flag, environment, else the SQLite file in the
    working directory. With ``must_exist``, a missing default file is an error
    (a listing must not silently create an empty database)."""
    given = _given(getattr(args, "storage", None), STORAGE_ENV)
    if given is not None:
        return given
    path = Path.cwd() / DEFAULT_SQLITE_FILE
    if must_exist and not path.exists():
        raise ConfigurationError(
            f"no storage given and {path} does not exist: pass --storage URL or set "
            f"{STORAGE_ENV} (or run 'orchestratr manager' in this directory first)"
        )
    return sqlite_url(path)


def _transport_url(args: argparse.Namespace) -> str:
    given = _given(getattr(args, "transport", None), TRANSPORT_ENV)
    if given is None:
        raise ConfigurationError(
            f"no transport given: pass --transport URL or set {TRANSPORT_ENV} "
            "(e.g. amqp://guest:guest@localhost:5672/)"
        )
    return given


def _describe(url: str) -> str:
    """A storage or transport for display: its URL with the password masked."""
    return str(mask_url(url))


class _OpenStorage:
    """``async with _OpenStorage(url) as storage``: build, open and always close."""

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


# -- output ------------------------------------------------------------------------------


_C1_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _print_json(value: object) -> None:
    # Still exact JSON: DEL and C1 controls (which JSON leaves raw) become \u escapes.
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str).translate(_C1_ESCAPES))


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
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


def _ago(when: datetime | None) -> str:
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


def _fence(fence: int) -> str:
    generation, deliveries = split_fence(fence)
    return f"{fence} ({generation}.{deliveries})" if fence else "0"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _plain(value: object) -> object:
    """Turn what a backend returned into JSON-ready data."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# -- commands ------------------------------------------------------------------------------


async def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestratr_core.demo import run_demo

    storage = args.storage.strip() if args.storage and args.storage.strip() else None
    return await run_demo(storage=storage, forever=args.forever)


def _use_signing_key(args: argparse.Namespace) -> None:
    """Check the key file now (a clear error, not one deep in a transport) and hand
    it to the transports this process builds, through the environment they read."""
    path = getattr(args, "signing_key_file", None)
    signer = load_signer(path)
    if path:
        os.environ[KEY_FILE_ENV] = str(Path(path).resolve())
    if signer is not None:
        log.info("messages are signed with key %s", ", accepted: ".join(signer.key_ids))


async def _cmd_server(args: argparse.Namespace) -> int:
    _use_signing_key(args)
    job = load_job(args.job)
    transport = _transport_url(args)
    options = _options(
        ServerOptions(), heartbeat_interval=args.heartbeat_interval, stop_grace=args.stop_grace
    )
    server = OrchestratedServer(
        job, transport=transport, name=args.name, max_workers=args.max_workers, options=options
    )
    log.info(
        "server %s (%s) starting: job %s, max %d workers, transport %s",
        args.name,
        server.id,
        args.job,
        args.max_workers,
        _describe(transport),
    )
    if args.otel:
        from orchestratr_core.otel import install

        install()
    metrics = None
    if args.metrics:
        from orchestratr_core.metrics import parse_listen_address, start_metrics_server

        metrics = start_metrics_server(*parse_listen_address(args.metrics, 9464))
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
    _use_signing_key(args)
    storage = _storage_url(args, must_exist=False)
    transport = _transport_url(args)
    if _given(args.storage, STORAGE_ENV) is None:
        print(f"storage: SQLite file {Path.cwd() / DEFAULT_SQLITE_FILE}", flush=True)
    options = _options(
        ManagerOptions(),
        server_timeout=args.server_timeout,
        sweep_interval=args.sweep_interval,
        rebalance_interval=args.rebalance_interval,
        rebalance=args.rebalance,
    )
    if args.http:
        from orchestratr_core.web import resolve_token

        resolve_token(args.api_token)  # a token that cannot work stops us before we start
    manager = ServerManager(storage=storage, transport=transport, options=options)
    log.info("manager starting: storage %s, transport %s", _describe(storage), _describe(transport))
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

    _use_signing_key(args)
    storage = _storage_url(args, must_exist=True)
    transport = _transport_url(args)
    host, port = parse_listen_address(args.http, 8080)
    await run_web(storage, transport, host, port, args.api_token, **_web_options(args))
    return 0


async def _cmd_jobs_create(args: argparse.Namespace) -> int:
    # Refuse bad input before touching the storage (the client checks again).
    validate_name(args.name)
    validate_argument(args.argument)
    async with _OpenStorage(_storage_url(args, must_exist=False)) as storage:
        job_id = await OrchestratorClient(storage).create_job(args.name, args.argument)
    if args.json:
        _print_json({"id": job_id, "name": args.name, "status": JobStatus.PENDING.value})
    else:
        print(job_id)
        print(
            f"created job {args.name!r}; a running manager publishes it to the servers",
            file=sys.stderr,
        )
    return 0


async def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    async with _OpenStorage(_storage_url(args, must_exist=True)) as storage:
        job = await OrchestratorClient(storage).mark_on_deleting(args.id)
    if args.json:
        _print_json(job.to_dict())
    elif job.status is JobStatus.DELETING:
        print(f"job {job.name!r} ({job.id}) is being cancelled; it will not run again")
    else:
        print(f"job {job.name!r} ({job.id}) is {job.status.value}; nothing to cancel")
    return 0


async def _server_names(storage: Storage) -> dict[str, str]:
    servers = await OrchestratorMonitor(storage).servers(
        ServerQuery(statuses=None, with_jobs=False)
    )
    return {s.id: s.name for s in servers}


async def _cmd_jobs_list(args: argparse.Namespace) -> int:
    statuses = statuses_of([p for s in args.status for p in s.split(",") if p.strip()])
    query = JobQuery(
        statuses=statuses or None,
        name_prefix=args.name_prefix,
        server_id=args.server,
        include_deleted=args.include_deleted,
        after=args.after,
        limit=args.limit,
    )
    async with _OpenStorage(_storage_url(args, must_exist=True)) as storage:
        page = await OrchestratorMonitor(storage).jobs(query, with_total=True)
        names = {} if args.json else await _server_names(storage)
    if args.json:
        _print_json(
            {
                "items": [j.to_dict() for j in page.items],
                "next_cursor": page.next_cursor,
                "total": page.total,
            }
        )
        return 0
    if not page.items:
        print("no jobs match")
        return 0
    print(
        _table(
            ["ID", "NAME", "STATUS", "SERVER", "FENCE", "RESTARTS", "UPDATED"],
            [
                [
                    j.id,
                    _short(j.name),
                    j.status.value,
                    _server_label(j.server_id, names),
                    _fence(j.fence),
                    j.restarts,
                    _ago(j.updated_at),
                ]
                for j in page.items
            ],
        )
    )
    total = f" of {page.total}" if page.total is not None else ""
    print(f"\n{len(page.items)}{total} jobs shown", end="")
    if page.next_cursor:
        print(f"; next page: --after {page.next_cursor}")
    else:
        print()
    return 0


def _server_label(server_id: str | None, names: dict[str, str]) -> str | None:
    if server_id is None:
        return None
    name = names.get(server_id)
    # Ids are time-ordered: their tails, not their heads, tell servers apart.
    return f"{name} (..{server_id[-6:]})" if name else server_id


async def _cmd_jobs_show(args: argparse.Namespace) -> int:
    async with _OpenStorage(_storage_url(args, must_exist=True)) as storage:
        job = await OrchestratorMonitor(storage).job(args.id)
        names = {} if args.json else await _server_names(storage)
    if args.json:
        _print_json(job.to_dict())
        return 0
    _print_job(job, names)
    return 0


def _print_job(job: JobRecord, names: dict[str, str]) -> None:
    rows = [
        ("id", job.id),
        ("name", job.name),
        ("argument", _short(job.argument, 70) if job.argument else '""'),
        ("status", job.status.value),
        ("server", _server_label(job.server_id, names)),
        ("fence", _fence(job.fence)),
        ("generation", job.generation),
        ("created", f"{job.created_at.isoformat()} ({_ago(job.created_at)})"),
        ("updated", f"{job.updated_at.isoformat()} ({_ago(job.updated_at)})"),
        ("started", job.started_at and f"{job.started_at.isoformat()} ({_ago(job.started_at)})"),
        ("last heartbeat", _ago(job.last_heartbeat) if job.last_heartbeat else None),
        ("restarts", job.restarts),
        ("last error", job.last_error),
        ("reason", job.reason),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {'-' if value is None else printable(str(value))}")


async def _cmd_servers_list(args: argparse.Namespace) -> int:
    query = ServerQuery(statuses=None) if args.all else ServerQuery()
    async with _OpenStorage(_storage_url(args, must_exist=True)) as storage:
        servers = await OrchestratorMonitor(storage).servers(query)
    if args.json:
        _print_json([s.to_dict() for s in servers])
        return 0
    if not servers:
        print("no servers" if args.all else "no live servers (--all lists those that died or left)")
        return 0
    print(
        _table(
            ["ID", "NAME", "STATUS", "JOBS", "LAST SEEN", "HOST", "PID"],
            [_server_row(s) for s in servers],
        )
    )
    return 0


def _server_row(server: ServerRecord) -> list[object]:
    return [
        server.id,
        server.name,
        server.status.value,
        f"{len(server.running)}/{server.max_workers}",
        _ago(server.last_seen),
        server.host or None,
        server.pid or None,
    ]


async def _cmd_servers_drain(args: argparse.Namespace) -> int:
    _use_signing_key(args)
    transport_url = _transport_url(args)
    async with _OpenStorage(_storage_url(args, must_exist=True)) as storage:
        server = await OrchestratorMonitor(storage).server(args.id)
        transport = get_plugin_manager().make_transport(transport_url)
        await transport.connect()
        try:
            manager = ServerManager(storage=storage, transport=transport)
            await manager.drain_server(server.id)
        finally:
            await transport.close()
    print(f"server {server.name!r} ({server.id}) told to hand its {len(server.running)} jobs back")
    return 0


async def _cmd_plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager()
    available = pm.available()
    schemes: dict[str, list[str]] = {}
    for scheme, plugin in sorted(pm.schemes().items()):
        schemes.setdefault(plugin, []).append(scheme)
    blocked = {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}
    rows = [
        {
            "name": name,
            "distribution": dist,
            "schemes": schemes.get(name, []),
            "blocked": name in blocked,
        }
        for name, dist in sorted(available.items())
    ]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no backend plugins installed (pip install orchestratr-memory, ...)")
        return 0
    print(
        _table(
            ["PLUGIN", "DISTRIBUTION", "URL SCHEMES", "NOTE"],
            [
                [
                    r["name"],
                    r["distribution"],
                    ", ".join(f"{s}://" for s in schemes.get(str(r["name"]), [])) or None,
                    f"blocked by {BLOCK_ENV}" if r["blocked"] else "",
                ]
                for r in rows
            ],
        )
    )
    return 0


def _sql_module() -> Any:
    try:
        return importlib.import_module("orchestratr_sql")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "orchestratr_sql":
            raise
        raise MissingDriver("db", "orchestratr-sql", "orchestratr-sql[all]") from None


def _sql_url(args: argparse.Namespace, *, must_exist: bool) -> str:
    url = _storage_url(args, must_exist=must_exist)
    if "://" not in url:
        raise ConfigurationError(
            f"db commands need a SQL storage URL (sqlite:///path, postgresql://..., "
            f"mysql://..., mssql://...), not {url!r}"
        )
    return url


async def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    url = _sql_url(args, must_exist=False)
    applied = _plain(await _sql_module().upgrade(url))
    if isinstance(applied, list) and not applied:
        print(f"{_describe(url)}: the schema was already up to date")
    elif isinstance(applied, list):
        print(f"{_describe(url)}: applied {len(applied)} migration(s): {_cell(applied)}")
    else:
        print(f"{_describe(url)}: schema up to date ({_cell(applied)})")
    return 0


async def _cmd_db_status(args: argparse.Namespace) -> int:
    url = _sql_url(args, must_exist=True)
    result = _plain(await _sql_module().status(url))
    if args.json:
        _print_json(result)
        return 0
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            print(f"{key.ljust(width)}  {printable(_cell(value))}")
    else:
        print(printable(_cell(result)))
    return 0


def _cell(value: object) -> str:
    """A value for a person: lists joined, ``None`` as ``-``, booleans as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "none"
    return str(value)


# -- entry point ---------------------------------------------------------------------------------


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
        _secret_of(getattr(args, name, None))
    _secret_of(os.environ.get(STORAGE_ENV))
    _secret_of(os.environ.get(TRANSPORT_ENV))
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


if __name__ == "__main__":
    sys.exit(main())
