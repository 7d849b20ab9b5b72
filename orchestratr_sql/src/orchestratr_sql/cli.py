"""``orchestratr db upgrade | status``: the SQL storage's own commands, added to the
``orchestratr`` CLI through the ``orchestratr_cli_commands`` hook."""

from __future__ import annotations

import argparse

from orchestratr_core.cli.api import cell, describe, plain, print_json, storage_url
from orchestratr_core.display import printable
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.plugin import hookimpl
from orchestratr_core.plugin.spec import CommandParents

__all__ = ["orchestratr_cli_commands"]


@hookimpl
def orchestratr_cli_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add ``orchestratr db``."""
    db = commands.add_parser("db", parents=[parents.common], help="SQL schema migrations")
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", parents=[parents.common, parents.storage], help="apply pending schema migrations"
    )
    upgrade.set_defaults(handler=_cmd_db_upgrade)
    status = db_commands.add_parser(
        "status",
        parents=[parents.common, parents.storage, parents.as_json],
        help="show the schema version",
    )
    status.set_defaults(handler=_cmd_db_status)


def _sql_url(args: argparse.Namespace, *, must_exist: bool) -> str:
    url = storage_url(args, must_exist=must_exist)
    if "://" not in url:
        raise ConfigurationError(
            f"db commands need a SQL storage URL (sqlite:///path, postgresql://..., "
            f"mysql://..., mssql://...), not {url!r}"
        )
    return url


async def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from orchestratr_sql.admin import upgrade

    url = _sql_url(args, must_exist=False)
    applied = plain(await upgrade(url))
    if isinstance(applied, list) and not applied:
        print(f"{describe(url)}: the schema was already up to date")
    elif isinstance(applied, list):
        print(f"{describe(url)}: applied {len(applied)} migration(s): {cell(applied)}")
    else:
        print(f"{describe(url)}: schema up to date ({cell(applied)})")
    return 0


async def _cmd_db_status(args: argparse.Namespace) -> int:
    from orchestratr_sql.admin import status

    url = _sql_url(args, must_exist=True)
    result = plain(await status(url))
    if args.json:
        print_json(result)
        return 0
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            print(f"{key.ljust(width)}  {printable(cell(value))}")
    else:
        print(printable(cell(result)))
    return 0
