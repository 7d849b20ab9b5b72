"""``orchestratr jobs create | cancel | list | show | pause | resume | update``."""

from __future__ import annotations

import argparse
import sys

from orchestratr_core.cli.api import (
    OpenStorage,
    ago,
    duration,
    fence_label,
    positive_int,
    print_json,
    short,
    storage_url,
    table,
)
from orchestratr_core.client import OrchestratorClient
from orchestratr_core.display import printable
from orchestratr_core.errors import InvalidJobInput
from orchestratr_core.job import (
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    statuses_of,
    validate_argument,
    validate_name,
)
from orchestratr_core.monitor import OrchestratorMonitor
from orchestratr_core.placement import (
    DEFAULT_KIND,
    parse_constraints,
    validate_kind,
    validate_spread,
)
from orchestratr_core.plugin.spec import CommandParents
from orchestratr_core.storage import Storage

__all__ = ["add_commands"]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add this group's commands to the ``orchestratr`` parser."""
    jobs = commands.add_parser(
        "jobs", parents=[parents.common], help="create, cancel and list jobs"
    )
    job_commands = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    create = job_commands.add_parser(
        "create",
        parents=[parents.common, parents.storage, parents.as_json],
        help="create a job (a running manager publishes it)",
    )
    create.add_argument("name", help="the job's name, unique among jobs not deleted")
    create.add_argument("argument", nargs="?", default="", help="the job's argument string")
    create.add_argument(
        "--kind",
        default=DEFAULT_KIND,
        metavar="KIND",
        help="the job's kind: only a server that runs it (--job KIND=...) takes the job",
    )
    create.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "run only on a server with this label (KEY!=VALUE: without it; "
            "KEY=V1|V2: one of these values, KEY!=V1|V2: none of them); repeatable"
        ),
    )
    create.add_argument(
        "--spread",
        metavar="GROUP",
        help="avoid running two jobs of GROUP on one server while others have room",
    )
    create.set_defaults(handler=_cmd_jobs_create)
    cancel = job_commands.add_parser(
        "cancel",
        parents=[parents.common, parents.storage, parents.as_json],
        help="cancel a job for good",
    )
    cancel.add_argument("id", help="job id")
    cancel.set_defaults(handler=_cmd_jobs_cancel)
    listing = job_commands.add_parser(
        "list", parents=[parents.common, parents.storage, parents.as_json], help="list jobs (paged)"
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
    listing.add_argument("--kind", metavar="KIND", help="only jobs of this kind")
    listing.add_argument("--name-prefix", metavar="P", help="only names starting with P")
    listing.add_argument("--include-deleted", action="store_true", help="list deleted jobs too")
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="page size (default 100)"
    )
    listing.add_argument("--after", metavar="CURSOR", help="the next_cursor of the last page")
    listing.set_defaults(handler=_cmd_jobs_list)
    show = job_commands.add_parser(
        "show", parents=[parents.common, parents.storage, parents.as_json], help="show one job"
    )
    show.add_argument("id", help="job id")
    show.set_defaults(handler=_cmd_jobs_show)
    # Lifecycle controls (orchestratr_core.lifecycle): appended, the commands above unchanged.
    create.add_argument(
        "--max-restarts",
        type=_count,
        metavar="N",
        help="restart budget: quarantine the job after more than N failures within the window",
    )
    create.add_argument(
        "--restart-window",
        type=duration,
        metavar="S",
        help="the restart budget's window in seconds",
    )
    for name, verb, handler in (
        ("pause", "pause a job, or a selection, until resumed", _cmd_jobs_pause),
        ("resume", "resume a paused or quarantined job, or a selection", _cmd_jobs_resume),
    ):
        command = job_commands.add_parser(
            name, parents=[parents.common, parents.storage, parents.as_json], help=verb
        )
        command.add_argument("id", nargs="?", help="job id (or select with --kind / --name-prefix)")
        command.add_argument("--kind", metavar="K", help="every job of kind K")
        command.add_argument(
            "--name-prefix", metavar="P", help="every job whose name starts with P"
        )
        command.set_defaults(handler=handler)
    # Updating a job's argument: appended, the commands above unchanged.
    update = job_commands.add_parser(
        "update",
        parents=[parents.common, parents.storage, parents.as_json],
        help="replace a job's argument (a running job takes it in place if its function "
        "is @updatable, else it restarts with it)",
    )
    update.add_argument("id", help="job id")
    update.add_argument("argument", help="the job's new argument string")
    update.add_argument(
        "--restart",
        action="store_true",
        help="restart a running job with it even if its function could take it in place",
    )
    update.set_defaults(handler=_cmd_jobs_update)


async def _cmd_jobs_create(args: argparse.Namespace) -> int:
    # Refuse bad input before touching the storage (the client checks again).
    validate_name(args.name)
    validate_argument(args.argument)
    kind = validate_kind(args.kind)
    constraints = parse_constraints(args.require)
    validate_spread(args.spread)
    async with OpenStorage(storage_url(args, must_exist=False)) as storage:
        job_id = await OrchestratorClient(storage).create_job(
            args.name,
            args.argument,
            kind=kind,
            require=constraints,
            spread=args.spread,
            max_restarts=args.max_restarts,
            restart_window=args.restart_window,
        )
    if args.json:
        print_json(
            {
                "id": job_id,
                "name": args.name,
                "status": JobStatus.PENDING.value,
                "kind": kind,
                "constraints": list(constraints),
                "spread": args.spread,
            }
        )
    else:
        print(job_id)
        print(
            f"created job {args.name!r}; a running manager publishes it to the servers",
            file=sys.stderr,
        )
    return 0


async def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        job = await OrchestratorClient(storage).mark_on_deleting(args.id)
    if args.json:
        print_json(job.to_dict())
    elif job.status is JobStatus.DELETING:
        print(f"job {job.name!r} ({job.id}) is being cancelled; it will not run again")
    else:
        print(f"job {job.name!r} ({job.id}) is {job.status.value}; nothing to cancel")
    return 0


async def _cmd_jobs_pause(args: argparse.Namespace) -> int:
    return await _hold_or_release(args, pause=True)


async def _cmd_jobs_resume(args: argparse.Namespace) -> int:
    return await _hold_or_release(args, pause=False)


async def _hold_or_release(args: argparse.Namespace, *, pause: bool) -> int:
    """``jobs pause`` / ``jobs resume``: one job by id, or a selection."""
    selection = args.kind is not None or args.name_prefix is not None
    if (args.id is None) == (not selection):
        raise InvalidJobInput("give a job id, or select jobs with --kind and/or --name-prefix")
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        client = OrchestratorClient(storage)
        if args.id is not None:
            job = await (client.pause(args.id) if pause else client.resume(args.id))
            jobs = [job]
        elif pause:
            jobs = await client.pause_jobs(name_prefix=args.name_prefix, kind=args.kind)
        else:
            jobs = await client.resume_jobs(name_prefix=args.name_prefix, kind=args.kind)
    if args.json:
        print_json(jobs[0].to_dict() if args.id is not None else [j.to_dict() for j in jobs])
        return 0
    if args.id is None:
        print(f"{'paused' if pause else 'resumed'} {len(jobs)} job(s)")
        for job in jobs:
            print(f"  {job.id}  {printable(short(job.name))}  {job.status.value}")
        return 0
    job = jobs[0]
    wanted = (JobStatus.PAUSING, JobStatus.PAUSED) if pause else (JobStatus.PENDING,)
    if job.status in wanted:
        what = "is pausing; a running manager stops it" if pause else "is resumed"
        print(f"job {printable(job.name)!r} ({job.id}) {what}")
        return 0
    hint = (
        " (still pausing: resume it once it is paused)" if job.status is JobStatus.PAUSING else ""
    )
    print(
        f"job {printable(job.name)!r} ({job.id}) is {job.status.value}; "
        f"nothing to {'pause' if pause else 'resume'}{hint}"
    )
    return 1


async def _cmd_jobs_update(args: argparse.Namespace) -> int:
    validate_argument(args.argument)  # refused before touching the storage
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        job = await OrchestratorClient(storage).update(
            args.id, args.argument, in_place=not args.restart
        )
    if args.json:
        print_json(job.to_dict())
        return 0
    if job.update_mode == "in_place" and job.status is JobStatus.PROCESSING:
        what = (
            "its running copy takes it without a restart (a running manager sends it, "
            "and restarts the job with it if the copy does not acknowledge it)"
        )
    elif job.update_pending:
        what = "it restarts with it once its running copy stopped (a running manager does it)"
    elif job.status is JobStatus.PAUSING:
        what = "it is pausing, and starts with it when resumed"
    else:
        what = f"it is {job.status.value}, and starts with it when resumed"
    print(
        f"job {printable(job.name)!r} ({job.id}): argument updated "
        f"(update {job.argument_version}); {what}"
    )
    return 0


def _count(text: str) -> int:
    """An argparse type: a count within 0..MAX_COUNT."""
    return 0 if text.strip() == "0" else positive_int(text)


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
        kind=args.kind,
        include_deleted=args.include_deleted,
        after=args.after,
        limit=args.limit,
    )
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        page = await OrchestratorMonitor(storage).jobs(query, with_total=True)
        names = {} if args.json else await _server_names(storage)
    if args.json:
        print_json(
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
        table(
            ["ID", "NAME", "STATUS", "SERVER", "FENCE", "RESTARTS", "UPDATED", "KIND"],
            [
                [
                    j.id,
                    short(j.name),
                    j.status.value,
                    _server_label(j.server_id, names),
                    fence_label(j.fence),
                    j.restarts,
                    ago(j.updated_at),
                    j.kind,
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
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        job = await OrchestratorMonitor(storage).job(args.id)
        names = {} if args.json else await _server_names(storage)
    if args.json:
        print_json(job.to_dict())
        return 0
    _print_job(job, names)
    return 0


def _checkpoint_label(job: JobRecord) -> str | None:
    if job.checkpoint is None or job.checkpoint_at is None:
        return None
    return f"{len(job.checkpoint.encode('utf-8'))} bytes, stored {ago(job.checkpoint_at)}"


def _update_label(job: JobRecord) -> str | None:
    if not job.argument_version or job.argument_updated_at is None:
        return None
    waiting = "; restart with it pending" if job.update_pending else ""
    if job.update_mode == "in_place":
        acked = job.argument_applied_version
        waiting = (
            "; taken in place"
            if acked >= job.argument_version
            else f"; in place, not yet acknowledged (applied: {acked or 'none'})"
        )
    return f"{job.argument_version}, last {ago(job.argument_updated_at)}{waiting}"


def _budget_label(job: JobRecord) -> str | None:
    if job.max_restarts is None and job.restart_window is None:
        return None
    limit = "default" if job.max_restarts is None else job.max_restarts
    window = "the default window" if job.restart_window is None else f"{job.restart_window:g} s"
    return f"at most {limit} failures within {window}"


def _print_job(job: JobRecord, names: dict[str, str]) -> None:
    rows = [
        ("id", job.id),
        ("name", job.name),
        ("argument", short(job.argument, 70) if job.argument else '""'),
        ("status", job.status.value),
        ("server", _server_label(job.server_id, names)),
        ("fence", fence_label(job.fence)),
        ("generation", job.generation),
        ("created", f"{job.created_at.isoformat()} ({ago(job.created_at)})"),
        ("updated", f"{job.updated_at.isoformat()} ({ago(job.updated_at)})"),
        ("started", job.started_at and f"{job.started_at.isoformat()} ({ago(job.started_at)})"),
        ("last heartbeat", ago(job.liveness) if job.liveness else None),
        ("restarts", job.restarts),
        ("last error", job.last_error),
        ("reason", job.reason),
        ("kind", job.kind),
        ("constraints", ", ".join(job.constraints) or None),
        ("spread", job.spread),
    ]
    # The lifecycle's rows only when they have something to say.
    lifecycle = [
        ("checkpoint", _checkpoint_label(job)),
        ("failures", job.failure_seq or None),
        ("restart budget", _budget_label(job)),
        ("argument updates", _update_label(job)),
    ]
    rows += [(key, value) for key, value in lifecycle if value is not None]
    if job.status is JobStatus.PENDING:
        rows.append(("pending reason", job.pending_reason))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {'-' if value is None else printable(str(value))}")
