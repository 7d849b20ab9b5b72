"""Every error OrchestratR raises on purpose.

Each carries a one-line message meant for a person: what went wrong and, where
there is one, what to do about it. None of them ever contains a credential.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "DataRejected",
    "DeadLetter",
    "DeliveryLost",
    "DuplicateJobName",
    "InvalidJobInput",
    "JobNotUpdatable",
    "MalformedMessage",
    "MissingDriver",
    "OrchestratrError",
    "PermanentBackendError",
    "PluginNotFound",
    "PublishError",
    "UnknownJob",
    "UnknownServer",
    "UnsupportedProtocolVersion",
]


class OrchestratrError(Exception):
    """Base class of every error raised by OrchestratR."""


class ConfigurationError(OrchestratrError, ValueError):
    """An option or URL is invalid (for example ``max_workers=0``)."""


class InvalidJobInput(OrchestratrError, ValueError):
    """A job name or argument was rejected by validation; nothing was stored."""


class DuplicateJobName(OrchestratrError):
    """A job with this name already exists and is not deleted."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a job named {name!r} already exists (cancel it first or pick another name)"
        )
        self.name = name


class UnknownJob(OrchestratrError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobNotUpdatable(OrchestratrError):
    """The job is cancelled (or being cancelled) or completed: it will never run
    again, so its argument cannot be updated. Nothing was changed."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(
            f"job {job_id!r} is {status}: it will never run again, so its argument "
            "cannot be updated (create a new job instead)"
        )
        self.job_id = job_id
        self.status = status


class UnknownServer(OrchestratrError, LookupError):
    """No server has this id."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"no server with id {server_id!r}")
        self.server_id = server_id


class PluginNotFound(OrchestratrError, LookupError):
    """No installed plugin has the requested name or URL scheme."""


class MissingDriver(OrchestratrError, ImportError):
    """A plugin is installed but the driver package it needs is not."""

    def __init__(self, plugin: str, package: str, install: str) -> None:
        super().__init__(
            f"plugin {plugin!r} needs the package {package!r}, which is not installed: "
            f"pip install '{install}'"
        )
        self.plugin = plugin
        self.package = package
        self.install = install


class BackendUnavailable(OrchestratrError, ConnectionError):
    """A broker or database cannot be reached right now; retrying may succeed."""


class PermanentBackendError(OrchestratrError):
    """A broker or database refused us for a reason retrying will not fix
    (wrong credentials, unknown database or vhost)."""


class DataRejected(OrchestratrError, ValueError):
    """A storage refused a value it was asked to write (out of its column's range,
    an encoding the database cannot store, too long, a constraint other than a
    unique one). Writing the same values again cannot succeed, so callers must not
    retry: the manager dead-letters the event that carried them. Storages raise it
    for every such driver error, so that the core never needs to know drivers."""


class DeadLetter(OrchestratrError):
    """Raised by an event handler (:data:`orchestratr_core.transport.EventHandler`)
    to say that this event can never be handled: every transport then
    dead-letters it (RabbitMQ: into ``<ns>.dead``) with one warning line carrying
    this message, and delivers the next event, instead of redelivering this one.
    Any other exception from a handler means "try again later"."""


class PublishError(OrchestratrError):
    """The transport could not confirm that a message was stored by the broker."""


class DeliveryLost(OrchestratrError):
    """The channel or connection that delivered a job is gone; the job is no
    longer ours and must already have been stopped."""


class MalformedMessage(OrchestratrError, ValueError):
    """A message could not be decoded: not JSON, not ours, or missing fields."""


class UnsupportedProtocolVersion(MalformedMessage):
    """A message was written by a newer protocol version than this process speaks."""
