"""A small typed facade over pluggy: the rest of the code never calls ``pm.hook``."""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pluggy

from orchestratr_core.display import mask_url
from orchestratr_core.errors import ConfigurationError, PluginNotFound
from orchestratr_core.plugin import spec as _spec
from orchestratr_core.plugin.spec import PROJECT_NAME, BackendSpec, CommandParents, hookimpl
from orchestratr_core.runner import default_runner

if TYPE_CHECKING:
    from orchestratr_core.runner import JobRunner
    from orchestratr_core.storage import Storage
    from orchestratr_core.transport import Transport

__all__ = [
    "BackendSpec",
    "PluginManager",
    "blocked_names",
    "get_plugin_manager",
    "make_storage",
    "make_transport",
    "mask_url",
]

log = logging.getLogger("orchestratr.plugins")

BACKEND_GROUP = "orchestratr"
SCHEME_GROUP = "orchestratr.schemes"
EXTENSION_GROUP = "orchestratr.extensions"
COMMAND_GROUP = "orchestratr.commands"
BLOCK_ENV = "ORCHESTRATR_BLOCK_PLUGINS"


def blocked_names() -> frozenset[str]:
    """The plugin names ``ORCHESTRATR_BLOCK_PLUGINS`` blocks now."""
    raw = os.environ.get(BLOCK_ENV, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


class _DefaultRunner:
    """The core's own ``orchestratr_make_runner``, asked after every plugin's."""

    @hookimpl(trylast=True)
    def orchestratr_make_runner(self, func: Callable[..., Any]) -> JobRunner | None:
        """Coroutine functions as tasks, anything else in a thread."""
        return default_runner(func)


class PluginManager:
    """Finds, loads and calls OrchestratR plugins."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(_spec)
        self._loaded: dict[str, object] = {}
        self._extensions_loaded = False
        self._commands_loaded = False
        for name in blocked_names():
            self._pm.set_blocked(name)
        self._pm.register(_DefaultRunner(), name="orchestratr_core.runner")

    # -- discovery ----------------------------------------------------------------

    @staticmethod
    def available() -> dict[str, str]:
        """Installed backend plugins: name -> distribution that provides it."""
        out: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=BACKEND_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            out[ep.name] = dist
        return out

    @staticmethod
    def schemes() -> dict[str, str]:
        """URL scheme -> plugin name, from installed distributions."""
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=SCHEME_GROUP)}

    def blocked(self, name: str) -> bool:
        """Whether ``ORCHESTRATR_BLOCK_PLUGINS`` blocked this plugin name."""
        return self._pm.is_blocked(name)

    def _refuse_blocked(self, name: str) -> None:
        if self._pm.is_blocked(name):
            raise PluginNotFound(f"plugin {name!r} is blocked by {BLOCK_ENV}")

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module directly (tests, embedded use)."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._refuse_blocked(plugin_name)
        if self._pm.get_plugin(plugin_name) is None:
            self._pm.register(plugin, name=plugin_name)
        self._loaded[plugin_name] = plugin

    def resolve(self, name_or_url: str) -> BackendSpec:
        """Turn ``"postgresql"`` or ``"postgresql://host/db"`` into a :class:`BackendSpec`."""
        value = name_or_url.strip()
        if not value:
            raise ConfigurationError("no backend given (a plugin name or a URL)")
        if "://" in value or value.endswith(":"):
            scheme = value.split(":", 1)[0].lower()
            schemes = self.schemes()
            plugin = schemes.get(scheme)
            if plugin is None:
                raise PluginNotFound(
                    _unknown("URL scheme", scheme, sorted(schemes))
                    + " (the URL itself is not shown: it may hold a password)"
                )
            return BackendSpec(plugin=plugin, url=value)
        return BackendSpec(plugin=value)

    def load(self, plugin_name: str) -> object:
        """Import and register exactly one backend plugin by name."""
        if plugin_name in self._loaded:
            return self._loaded[plugin_name]
        self._refuse_blocked(plugin_name)
        available = self.available()
        if plugin_name not in available:  # an extension or command module is no backend
            raise PluginNotFound(_unknown("plugin", plugin_name, sorted(available)))
        self._pm.load_setuptools_entrypoints(BACKEND_GROUP, name=plugin_name)
        plugin = self._pm.get_plugin(plugin_name)
        self._loaded[plugin_name] = plugin
        return plugin

    def load_extensions(self) -> list[str]:
        """Load every ``orchestratr.extensions`` plugin that is not blocked."""
        if self._extensions_loaded:
            return []
        self._extensions_loaded = True
        names = self._load_group(EXTENSION_GROUP)
        self._loaded.update((name, self._pm.get_plugin(name)) for name in names)
        return names

    def _load_group(self, group: str) -> list[str]:
        """Register every plugin of an entry-point group that is not blocked."""
        before = {name for name, _ in self._pm.list_name_plugin()}
        for ep in importlib.metadata.entry_points(group=group):
            if self._pm.is_blocked(ep.name):
                log.info("%s plugin %s blocked by %s", group, ep.name, BLOCK_ENV)
        self._pm.load_setuptools_entrypoints(group)
        return [name for name, _ in self._pm.list_name_plugin() if name not in before]

    def add_commands(
        self,
        commands: argparse._SubParsersAction[argparse.ArgumentParser],
        parents: CommandParents,
    ) -> None:
        """Let the ``orchestratr.commands`` plugins add their CLI commands."""
        if not self._commands_loaded:
            self._commands_loaded = True
            self._load_group(COMMAND_GROUP)
        self._pm.hook.orchestratr_cli_commands(commands=commands, parents=parents)

    # -- typed hook calls -------------------------------------------------------------

    def make_transport(self, spec: BackendSpec | str) -> Transport:
        """Build a transport for a plugin name, URL or spec."""
        backend = self.resolve(spec) if isinstance(spec, str) else spec
        self.load(backend.plugin)
        result = self._pm.hook.orchestratr_make_transport(spec=backend)
        if result is None:
            raise PluginNotFound(f"plugin {backend.plugin!r} provides no transport")
        return cast("Transport", result)

    def make_storage(self, spec: BackendSpec | str) -> Storage:
        """Build a storage for a plugin name, URL or spec."""
        backend = self.resolve(spec) if isinstance(spec, str) else spec
        self.load(backend.plugin)
        result = self._pm.hook.orchestratr_make_storage(spec=backend)
        if result is None:
            raise PluginNotFound(f"plugin {backend.plugin!r} provides no storage")
        return cast("Storage", result)

    def make_runner(self, func: Callable[..., Any]) -> JobRunner:
        """Ask the runner hooks how to execute ``func``."""
        return cast("JobRunner", self._pm.hook.orchestratr_make_runner(func=func))

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook; an observer that raises is logged, never fatal."""
        caller = getattr(self._pm.hook, f"orchestratr_{hook}")
        if not caller.get_hookimpls():
            return  # nobody observes: a server notifies per job start and stop
        try:
            caller(**kwargs)
        except Exception:  # observers must not break a server
            log.exception("observer hook %s raised", hook)

    @property
    def loaded(self) -> dict[str, object]:
        """Plugins loaded so far by name."""
        return dict(self._loaded)

    @property
    def pluggy(self) -> pluggy.PluginManager:
        """The underlying pluggy manager (for tests and advanced use)."""
        return self._pm


def _unknown(what: str, name: str, known: list[str]) -> str:
    message = f"unknown {what} {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    message += f"; installed: {', '.join(known) if known else 'none'}"
    return message


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager."""
    global _default  # noqa: PLW0603 - one registry per process, like pytest's
    if _default is None:
        _default = PluginManager()
    return _default


def make_transport(spec: BackendSpec | str) -> Transport:
    """Build a transport by plugin name or URL with the process-wide manager."""
    return get_plugin_manager().make_transport(spec)


def make_storage(spec: BackendSpec | str) -> Storage:
    """Build a storage by plugin name or URL with the process-wide manager."""
    return get_plugin_manager().make_storage(spec)
