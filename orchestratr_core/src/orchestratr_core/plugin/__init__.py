"""OrchestratR's plugin system, on pluggy.

A backend is a module that implements some of the hooks in
:mod:`orchestratr_core.plugin.spec`, marked with :data:`hookimpl`, and is
registered in its distribution's ``pyproject.toml``::

    [project.entry-points.orchestratr]
    mybroker = "my_package.plugin"          # plugin name -> module

    [project.entry-points."orchestratr.schemes"]
    mybroker = "mybroker"                   # URL scheme -> plugin name

Only the module of the plugin that is selected gets imported. Extensions that
observe every process (metrics, logging) register under
``[project.entry-points."orchestratr.extensions"]`` and are loaded always.
Modules that add commands to the ``orchestratr`` CLI register under
``[project.entry-points."orchestratr.commands"]`` (hook ``orchestratr_cli_commands``).
``ORCHESTRATR_BLOCK_PLUGINS=name,name`` blocks plugins by name.
"""

from __future__ import annotations

from orchestratr_core.plugin.manager import (
    PluginManager,
    get_plugin_manager,
    make_storage,
    make_transport,
)
from orchestratr_core.plugin.spec import (
    PROJECT_NAME,
    BackendSpec,
    CommandParents,
    hookimpl,
    hookspec,
)

__all__ = [
    "PROJECT_NAME",
    "BackendSpec",
    "CommandParents",
    "PluginManager",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "make_storage",
    "make_transport",
]
