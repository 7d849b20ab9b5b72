"""``orchestratr plugins``: the installed backend plugins."""

from __future__ import annotations

import argparse

from orchestratr_core.cli.api import print_json, table
from orchestratr_core.plugin.manager import BLOCK_ENV, get_plugin_manager
from orchestratr_core.plugin.spec import CommandParents

__all__ = ["add_commands"]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add this group's commands to the ``orchestratr`` parser."""
    plugins = commands.add_parser(
        "plugins", parents=[parents.common, parents.as_json], help="list installed backend plugins"
    )
    plugins.set_defaults(handler=_cmd_plugins)


async def _cmd_plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager()
    available = pm.available()
    schemes: dict[str, list[str]] = {}
    for scheme, plugin in sorted(pm.schemes().items()):
        schemes.setdefault(plugin, []).append(scheme)
    rows = [
        {
            "name": name,
            "distribution": dist,
            "schemes": schemes.get(name, []),
            "blocked": pm.blocked(name),
        }
        for name, dist in sorted(available.items())
    ]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no backend plugins installed (pip install orchestratr-memory, ...)")
        return 0
    print(
        table(
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
