"""``orchestratr servers list | drain``."""

from __future__ import annotations

import argparse
import dataclasses

from orchestratr_core.cli.api import (
    OpenStorage,
    ago,
    print_json,
    storage_url,
    table,
    transport_url,
    use_signing_key,
)
from orchestratr_core.job import ServerQuery, ServerRecord
from orchestratr_core.manager import ServerManager
from orchestratr_core.monitor import OrchestratorMonitor
from orchestratr_core.plugin.manager import get_plugin_manager
from orchestratr_core.plugin.spec import CommandParents

__all__ = ["add_commands"]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add this group's commands to the ``orchestratr`` parser."""
    servers = commands.add_parser(
        "servers", parents=[parents.common], help="list and drain servers"
    )
    server_commands = servers.add_subparsers(
        dest="servers_command", metavar="SERVERS_COMMAND", required=True
    )
    servers_list = server_commands.add_parser(
        "list",
        parents=[parents.common, parents.storage, parents.as_json],
        help="list live servers and their jobs",
    )
    servers_list.add_argument(
        "--all", action="store_true", help="include servers that died or left"
    )
    servers_list.add_argument("--kind", metavar="KIND", help="only servers that run this kind")
    servers_list.add_argument("--label", metavar="KEY=VALUE", help="only servers with this label")
    servers_list.set_defaults(handler=_cmd_servers_list)
    drain = server_commands.add_parser(
        "drain",
        parents=[parents.common, parents.storage, parents.transport, parents.signing],
        help="tell a server to hand its jobs back and exit",
    )
    drain.add_argument("id", help="server id")
    drain.set_defaults(handler=_cmd_servers_drain)


async def _cmd_servers_list(args: argparse.Namespace) -> int:
    query = ServerQuery(statuses=None) if args.all else ServerQuery()
    query = dataclasses.replace(query, kind=args.kind, label=args.label)
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        servers = await OrchestratorMonitor(storage).servers(query)
    if args.json:
        print_json([s.to_dict() for s in servers])
        return 0
    if not servers:
        print("no servers" if args.all else "no live servers (--all lists those that died or left)")
        return 0
    print(
        table(
            ["ID", "NAME", "STATUS", "JOBS", "LAST SEEN", "HOST", "PID", "KINDS", "LABELS"],
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
        ago(server.last_seen),
        server.host or None,
        server.pid or None,
        ",".join(server.kinds),
        ",".join(server.labels) or None,
    ]


async def _cmd_servers_drain(args: argparse.Namespace) -> int:
    use_signing_key(args)
    transport_address = transport_url(args)
    async with OpenStorage(storage_url(args, must_exist=True)) as storage:
        server = await OrchestratorMonitor(storage).server(args.id)
        transport = get_plugin_manager().make_transport(transport_address)
        await transport.connect()
        try:
            manager = ServerManager(storage=storage, transport=transport)
            await manager.drain_server(server.id)
        finally:
            await transport.close()
    print(f"server {server.name!r} ({server.id}) told to hand its {len(server.running)} jobs back")
    return 0
