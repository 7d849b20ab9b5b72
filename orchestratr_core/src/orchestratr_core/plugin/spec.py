"""Hook specifications. Pluggy is synchronous: hooks *return* objects whose
methods are coroutines; the hooks themselves never do I/O."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from orchestratr_core.display import mask_url

if TYPE_CHECKING:
    from orchestratr_core.runner import JobRunner
    from orchestratr_core.storage import Storage
    from orchestratr_core.transport import Transport

__all__ = ["PROJECT_NAME", "BackendSpec", "CommandParents", "hookimpl", "hookspec"]

PROJECT_NAME = "orchestratr"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Mark a function of your plugin module as an implementation of a hook."""


@dataclass(frozen=True)
class BackendSpec:
    """Which backend to build and how: plugin name, URL and options."""

    plugin: str
    url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the URL: it may carry a password
        return f"BackendSpec(plugin={self.plugin!r}, url={mask_url(self.url)!r})"


@dataclass(frozen=True)
class CommandParents:
    """The option groups a command of the ``orchestratr`` CLI may take as
    ``parents=[...]`` (:func:`orchestratr_cli_commands`): each an ``add_help=False``
    parser."""

    common: argparse.ArgumentParser
    """``--log-level`` and ``--log-format``: give it to every command."""
    storage: argparse.ArgumentParser
    """``--storage URL``."""
    transport: argparse.ArgumentParser
    """``--transport URL``."""
    signing: argparse.ArgumentParser
    """``--signing-key-file PATH``."""
    as_json: argparse.ArgumentParser
    """``--json``."""


@hookspec(firstresult=True)
def orchestratr_make_transport(spec: BackendSpec) -> Transport | None:
    """Build a transport.

    Called when a process selected a transport whose plugin name is ``spec.plugin``.
    Return a new, not yet connected :class:`~orchestratr_core.transport.Transport`
    if ``spec.plugin`` is one of yours, else ``None``. Import your driver here,
    not at module import time, and raise
    :class:`~orchestratr_core.errors.MissingDriver` if it is missing. Raise
    :class:`~orchestratr_core.errors.ConfigurationError` for a bad URL or option.

    :param spec: the plugin name, the URL (may be ``None``) and keyword options.
    """


@hookspec(firstresult=True)
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """Build a storage.

    Like :func:`orchestratr_make_transport`, for a
    :class:`~orchestratr_core.storage.Storage`; not yet opened.

    :param spec: the plugin name, the URL (may be ``None``) and keyword options.
    """


@hookspec(firstresult=True)
def orchestratr_make_runner(func: Callable[..., Any]) -> JobRunner | None:
    """Choose how a job function is executed.

    Return a :class:`~orchestratr_core.runner.JobRunner` for ``func`` or ``None``
    to let another plugin decide. The core's defaults run coroutine functions as
    asyncio tasks and blocking functions in a thread pool sized to the server's
    ``max_workers``. Later-registered plugins are asked first.

    :param func: the job function given to the server.
    """


@hookspec
def orchestratr_job_started(
    server_id: str, job_id: str, name: str, fence: int, restarts: int
) -> None:
    """Observe: a server started (or restarted) a job. Called in the server
    process, on the event loop: return quickly and never raise."""


@hookspec
def orchestratr_job_stopped(
    server_id: str, job_id: str, name: str, fence: int, reason: str, forced: bool
) -> None:
    """Observe: a server stopped a job (``reason`` is a
    :class:`~orchestratr_core.protocol.StopReason` value)."""


@hookspec
def orchestratr_job_failed(
    server_id: str, job_id: str, name: str, fence: int, error: str, restarts: int, retry_in: float
) -> None:
    """Observe: a job function raised and will be restarted after ``retry_in`` seconds."""


@hookspec
def orchestratr_server_joined(server_id: str, name: str, max_workers: int) -> None:
    """Observe: a server started (called in that server), or a manager saw a new
    server (called in the manager)."""


@hookspec
def orchestratr_server_left(server_id: str, name: str, reason: str) -> None:
    """Observe: a server stopped (in that server), or a manager found it dead or
    gone (in the manager; ``reason`` is ``dead`` or ``left``)."""


@hookspec
def orchestratr_cli_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: CommandParents
) -> None:
    """Add commands to the ``orchestratr`` CLI (``orchestratr db ...`` comes from
    ``orchestratr-sql`` this way).

    Called while the parser is built, for the modules registered under
    ``[project.entry-points."orchestratr.commands"]``. Add a parser with
    ``commands.add_parser(name, parents=[parents.common, ...])`` and give each
    runnable command ``set_defaults(handler=async_function)``: it is awaited with the
    parsed ``argparse.Namespace`` and returns the exit status. Helpers for handlers
    (the storage URL, JSON output, tables) are in :mod:`orchestratr_core.cli.api`.

    :param commands: the sub-commands of ``orchestratr``.
    :param parents: the shared option groups.
    """
