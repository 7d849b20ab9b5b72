"""OrchestratR: run long-running ("infinite") jobs across a fleet of servers.

Each job runs on exactly one server, starts as soon as it is created, stops when
cancelled, and moves to a surviving server within moments when its server dies.
"""

from __future__ import annotations

from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJobName,
    InvalidJobInput,
    JobNotUpdatable,
    MissingDriver,
    OrchestratrError,
    PermanentBackendError,
    PluginNotFound,
    UnknownJob,
    UnknownServer,
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
from orchestratr_core.manager import ManagerOptions, ServerManager
from orchestratr_core.monitor import AdminOrchestratorMonitor, OrchestratorMonitor
from orchestratr_core.plugin import BackendSpec, get_plugin_manager, hookimpl
from orchestratr_core.runner import StopToken
from orchestratr_core.server import OrchestratedServer, ServerOptions

__version__ = "0.1.0"

__all__ = [
    "AdminOrchestratorMonitor",
    "BackendSpec",
    "BackendUnavailable",
    "ConfigurationError",
    "DuplicateJobName",
    "InvalidJobInput",
    "JobArgument",
    "JobNotUpdatable",
    "JobPage",
    "JobQuery",
    "JobRecord",
    "JobStatus",
    "ManagerOptions",
    "MissingDriver",
    "OrchestratedServer",
    "OrchestratorClient",
    "OrchestratorMonitor",
    "OrchestratrError",
    "PermanentBackendError",
    "PluginNotFound",
    "ServerManager",
    "ServerOptions",
    "ServerQuery",
    "ServerRecord",
    "ServerStatus",
    "StopToken",
    "UnknownJob",
    "UnknownServer",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
]
