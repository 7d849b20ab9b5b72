"""OrchestratR's in-memory backends: the reference transport and storage.

They keep everything in this process, so they serve tests, demos and a
single-process deployment. ``memory://name`` URLs share one store or broker by
name within the process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestratr_memory.storage import MemoryStorage

if TYPE_CHECKING:
    from orchestratr_memory.broker import MemoryBroker
    from orchestratr_memory.transport import MemoryTransport

__all__ = ["MemoryBroker", "MemoryStorage", "MemoryTransport"]

_LAZY = {
    "MemoryTransport": "orchestratr_memory.transport",
    "MemoryBroker": "orchestratr_memory.broker",
}


def __getattr__(name: str) -> Any:
    """Import the transport side only when it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
