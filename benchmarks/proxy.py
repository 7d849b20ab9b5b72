"""A TCP proxy to the broker that can stop forwarding without closing anything,
like a cable pulled between two hosts (a silent partition).

    python -m benchmarks.proxy [--upstream 127.0.0.1:5672]

Prints ``port <n>`` once it listens on 127.0.0.1. ``SIGUSR1`` stops forwarding in
both directions (bytes stay buffered, no FIN, no RST); ``SIGUSR2`` resumes.
Runs in a process of its own so that its work never shares an event loop with
the system under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


class Proxy:
    """See the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    async def pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(65536)
                await self.flowing.wait()  # a partition swallows the FIN too
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", default="127.0.0.1:5672")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy(host, int(port))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.flowing.clear)
    loop.add_signal_handler(signal.SIGUSR2, proxy.flowing.set)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    server = await asyncio.start_server(proxy.accept, "127.0.0.1", 0, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    await done.wait()


if __name__ == "__main__":
    asyncio.run(main())
