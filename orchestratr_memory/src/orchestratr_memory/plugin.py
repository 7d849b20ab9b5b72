"""The ``memory`` plugin: in-process transport and storage (``memory://name``).

Registered under the ``orchestratr`` entry-point group as ``memory`` and under
``orchestratr.schemes`` for the ``memory://`` URL scheme. Each hook imports
only what it builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.plugin import hookimpl

if TYPE_CHECKING:
    from orchestratr_core.plugin import BackendSpec
    from orchestratr_core.storage import Storage
    from orchestratr_core.transport import Transport

__all__ = ["PLUGIN_NAME", "orchestratr_make_storage", "orchestratr_make_transport"]

PLUGIN_NAME = "memory"
"""The plugin name (and URL scheme) this module answers to."""


@hookimpl
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """Build a :class:`~orchestratr_memory.storage.MemoryStorage` for ``memory``."""
    if spec.plugin != PLUGIN_NAME:
        return None
    if spec.options:
        unknown = ", ".join(sorted(spec.options))
        raise ConfigurationError(f"the memory storage takes no options (got: {unknown})")
    from orchestratr_memory.storage import MemoryStorage

    return MemoryStorage(url=spec.url)


@hookimpl
def orchestratr_make_transport(spec: BackendSpec) -> Transport | None:
    """Build a :class:`~orchestratr_memory.transport.MemoryTransport` for ``memory``."""
    if spec.plugin != PLUGIN_NAME:
        return None
    from orchestratr_memory.transport import MemoryTransport

    return MemoryTransport(url=spec.url, **spec.options)
