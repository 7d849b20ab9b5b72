"""The server runtime (:class:`OrchestratedServer`), in four rooms:

* :mod:`~orchestratr_core.server.runtime` -- the server: deliveries, supervisors,
  commands, start and stop;
* :mod:`~orchestratr_core.server.options` -- its timings and the checks of its name;
* :mod:`~orchestratr_core.server.run` -- one running job, what wakes its supervisor,
  and the garbage-collector tending of a server holding many;
* :mod:`~orchestratr_core.server.outbox` -- events on their way to the manager and
  the coalescing of start reports.
"""

from __future__ import annotations

from orchestratr_core.retry import backoff_delay  # defined here before retry.py existed
from orchestratr_core.server.options import ServerOptions
from orchestratr_core.server.runtime import JobFunction, OrchestratedServer

__all__ = ["JobFunction", "OrchestratedServer", "ServerOptions", "backoff_delay"]
