"""A small typed facade over pluggy: the rest of the code never calls ``pm.hook``."""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pluggy

from orchestratr_core.display import mask_url
from orchestratr_core.errors import ConfigurationError, PluginNotFound
from orchestratr_core.plugin import spec as _spec
from orchestratr_core.plugin.spec import PROJECT_NAME

if TYPE_CHECKING:
    from orchestratr_core.runner import JobRunner
    from orchestratr_core.storage import Storage
    from orchestratr_core.transport import Transport

__all__ = [
    "BackendSpec",
    "PluginManager",
    "get_plugin_manager",
    "make_storage",
    "make_transport",
    "mask_url",
]

log = logging.getLogger("orchestratr.plugins")

BACKEND_GROUP = "orchestratr"
SCHEME_GROUP = "orchestratr.schemes"
EXTENSION_GROUP = "orchestratr.extensions"
BLOCK_ENV = "ORCHESTRATR_BLOCK_PLUGINS"


@dataclass(frozen=True)
class BackendSpec:
    """Which backend to build and how: plugin name, URL and options."""

    plugin: str
    url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the URL: it may carry a password
        return f"BackendSpec(plugin={self.plugin!r}, url={mask_url(self.url)!r})"


def _blocked() -> frozenset[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


class PluginManager:
    """Finds, loads and calls OrchestratR plugins."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(_spec)
        self._loaded: dict[str, object] = {}
        self._extensions_loaded = False
        from orchestratr_core import runner

        self._pm.register(runner, name="orchestratr_core.runner")

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

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module directly (tests, embedded use)."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if plugin_name in _blocked():
            raise PluginNotFound(f"plugin {plugin_name!r} is blocked by {BLOCK_ENV}")
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
        if plugin_name in _blocked():
            raise PluginNotFound(f"plugin {plugin_name!r} is blocked by {BLOCK_ENV}")
        found = [
            ep
            for ep in importlib.metadata.entry_points(group=BACKEND_GROUP)
            if ep.name == plugin_name
        ]
        if not found:
            raise PluginNotFound(_unknown("plugin", plugin_name, sorted(self.available())))
        module = found[0].load()
        self.register(module, name=plugin_name)
        return module

    def load_extensions(self) -> list[str]:
        """Load every ``orchestratr.extensions`` plugin that is not blocked."""
        names: list[str] = []
        if self._extensions_loaded:
            return names
        self._extensions_loaded = True
        blocked = _blocked()
        for ep in importlib.metadata.entry_points(group=EXTENSION_GROUP):
            if ep.name in blocked:
                log.info("extension %s blocked by %s", ep.name, BLOCK_ENV)
                continue
            self.register(ep.load(), name=ep.name)
            names.append(ep.name)
        return names

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
