"""A TCP proxy that can go silent: it stops forwarding in both directions without
closing anything, like a cable pulled between two hosts. Backend authors use it to
test that their transport fences itself before the broker reassigns its messages
(a partition that neither side sees as a closed socket)."""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["SilentProxy"]


class SilentProxy:
    """Forwards TCP between clients and the broker; :meth:`pause` stops forwarding in
    both directions without closing anything, like a cable pulled between hosts."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5672) -> None:
        """Forward to ``upstream_host:upstream_port`` once :meth:`start` is awaited."""
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.paused_at: float | None = None
        self._stopped = False

    async def start(self) -> None:
        """Listen on a free local port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The AMQP URL that goes through this proxy."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def pause(self) -> None:
        """Stop forwarding (nothing is closed; bytes stay where they are)."""
        self.paused_at = time.monotonic()
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again."""
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        if self._stopped:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(65536)
                # A partition swallows everything, including the FIN of a closing side.
                await self._flowing.wait()
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()

    async def stop(self) -> None:
        """Close everything (the broker then sees the connections end)."""
        self._stopped = True
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
