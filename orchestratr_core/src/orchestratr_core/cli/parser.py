"""The parser of the ``orchestratr`` command: the shared option groups, the core's
command groups, then the commands of the ``orchestratr.commands`` plugins."""

from __future__ import annotations

import argparse
from typing import cast

from orchestratr_core.backend_urls import DEFAULT_SQLITE_FILE, STORAGE_ENV, TRANSPORT_ENV
from orchestratr_core.cli.api import PROG, Parser
from orchestratr_core.cli.cmd import demo, jobs, plugins, run, servers
from orchestratr_core.plugin.manager import get_plugin_manager
from orchestratr_core.plugin.spec import CommandParents
from orchestratr_core.signing import KEY_ENV, KEY_FILE_ENV

__all__ = ["build_parser", "command_parents"]

_GROUPS = (demo, run, jobs, servers, plugins)
"""The core's command groups, in the order ``--help`` lists them."""


def command_parents() -> CommandParents:
    """The option groups commands share (each an ``add_help=False`` parser)."""
    # Options every command accepts, before or after its name. SUPPRESS keeps a
    # sub-command's default from overwriting a value given before the command.
    common = Parser(add_help=False)
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
    as_json = Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print JSON for scripts instead of a table"
    )
    storage = Parser(add_help=False)
    storage.add_argument(
        "--storage",
        metavar="URL",
        help=f"storage plugin name or URL (default: ${STORAGE_ENV}, else sqlite file "
        f"./{DEFAULT_SQLITE_FILE})",
    )
    transport = Parser(add_help=False)
    transport.add_argument(
        "--transport",
        metavar="URL",
        help=f"transport plugin name or URL (default: ${TRANSPORT_ENV})",
    )
    signing = Parser(add_help=False)
    signing.add_argument(
        "--signing-key-file",
        metavar="PATH",
        help="sign every message and accept only signed ones: a file with the fleet's "
        f"key, and optionally the previous one (default: ${KEY_FILE_ENV}, else ${KEY_ENV})",
    )
    return CommandParents(
        common=common, storage=storage, transport=transport, signing=signing, as_json=as_json
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``orchestratr`` command."""
    parents = command_parents()
    parser = Parser(
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
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
    )
    for group in _GROUPS:
        group.add_commands(commands, parents)
    get_plugin_manager().add_commands(commands, parents)
    return parser


def _version() -> str:
    from orchestratr_core import __version__

    return __version__
