"""OrchestratR: run long-running ("infinite") jobs across a fleet of servers.

Each job runs on exactly one server, starts as soon as it is created, stops when
cancelled, and moves to a surviving server within moments when its server dies.
"""

from __future__ import annotations

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJobName,
    InvalidJobInput,
    MissingDriver,
    OrchestratrError,
    PermanentBackendError,
    PluginNotFound,
    UnknownJob,
)
from orchestratr_core.job import (
    JobArgument,
    JobPage,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    ServerStatus,
)
from orchestratr_core.plugin import BackendSpec, get_plugin_manager, hookimpl
from orchestratr_core.runner import StopToken

__version__ = "0.1.0"

__all__ = [
    "BackendSpec",
    "BackendUnavailable",
    "ConfigurationError",
    "DuplicateJobName",
    "InvalidJobInput",
    "JobArgument",
    "JobPage",
    "JobQuery",
    "JobRecord",
    "JobStatus",
    "MissingDriver",
    "OrchestratrError",
    "PermanentBackendError",
    "PluginNotFound",
    "ServerQuery",
    "ServerRecord",
    "ServerStatus",
    "StopToken",
    "UnknownJob",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
]
