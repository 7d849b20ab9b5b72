"""``orchestratr demo``: the one-process tour."""

from __future__ import annotations

import argparse

from orchestratr_core.plugin.spec import CommandParents

__all__ = ["add_commands"]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add this group's commands to the ``orchestratr`` parser."""
    demo = commands.add_parser(
        "demo",
        parents=[parents.common],
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


async def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestratr_core.demo import run_demo

    storage = args.storage.strip() if args.storage and args.storage.strip() else None
    return await run_demo(storage=storage, forever=args.forever)
