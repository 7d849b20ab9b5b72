"""Running jobs per server over the last minutes, kept in the app's memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from orchestratr_core._aio import cancel_and_log, spawn
from orchestratr_core.errors import OrchestratrError
from orchestratr_core.job import JobStatus
from orchestratr_core.monitor import OrchestratorMonitor

__all__ = ["FleetHistory", "Sample"]

log = logging.getLogger("orchestratr.web")


@dataclass(frozen=True)
class Sample:
    """Running jobs per live server id at one instant (epoch seconds)."""

    t: float
    running: dict[str, int]


class FleetHistory:
    """Samples the live servers every ``interval`` seconds and keeps ``window``
    seconds of samples (one listing of the live servers per sample: cheap at any
    number of jobs).

    :param monitor: where to read the servers from.
    """

    def __init__(
        self, monitor: OrchestratorMonitor, *, interval: float = 1.0, window: float = 600.0
    ) -> None:
        self._monitor = monitor
        self.interval = interval
        self.window = window
        self._samples: deque[Sample] = deque()
        self.names: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def sample(self) -> Sample:
        """Take one sample now."""
        async with self._lock:
            servers = await self._monitor.servers()
            running = {
                s.id: sum(1 for j in s.running if j.status is JobStatus.PROCESSING) for s in servers
            }
            for s in servers:
                self.names[s.id] = s.name
            now = time.time()
            sample = Sample(now, running)
            self._samples.append(sample)
            while self._samples and self._samples[0].t < now - self.window:
                self._samples.popleft()
            alive = {sid for s in self._samples for sid in s.running}
            self.names = {sid: name for sid, name in self.names.items() if sid in alive}
            return sample

    async def sample_if_stale(self) -> None:
        """Sample unless the last sample is younger than ``interval`` (so the chart
        fills while someone watches even without the background sampler)."""
        last = self._samples[-1].t if self._samples else 0.0
        if time.time() - last >= self.interval:
            await self.sample()

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        return list(self._samples)

    def start(self) -> None:
        """Sample in the background until :meth:`stop`."""
        if self._task is None or self._task.done():
            self._task = spawn(self._run(), name="orchestratr-web-history", logger=log)

    async def stop(self) -> None:
        """Stop the background sampler."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_log([task], logger=log)

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except OrchestratrError as exc:
                log.warning("could not sample the servers for the chart: %s", exc)
            except Exception:
                log.exception("could not sample the servers for the chart")
            await asyncio.sleep(self.interval)
