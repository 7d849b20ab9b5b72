"""The Dramatiq side of the benchmarks: one "infinite" actor on RabbitMQ, and a
worker process (``python -m benchmarks.dramatiq_app --threads N``).

Settings (recorded in the results JSON):

* ``RabbitmqBroker(url=...)`` — Dramatiq acknowledges a message only after the
  actor returns, so a dead worker's messages go back to the queue;
* worker threads = the jobs one worker may hold; ``dramatiq_queue_prefetch`` =
  threads as well (Dramatiq's default is 2 x threads, which would park messages
  behind running infinite tasks);
* actor ``time_limit`` = 2**31-1 ms (the default, 10 min, kills an infinite task),
  ``max_retries = 0``;
* AMQP heartbeat from ``BENCH_HEARTBEAT`` (pika's default: the broker's 60 s);
* classic queue (Dramatiq declares its own queues, with a dead-letter queue and a
  delay queue; it cannot declare quorum queues).

Dramatiq has no way to cancel a running message (the third-party
``dramatiq-abort`` needs Redis or a backend of its own); the loop checks a
process-wide stop flag, set when the worker shuts down.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

QUEUE = os.environ.get("BENCH_QUEUE", "bench-dramatiq")
THREADS = int(os.environ.get("BENCH_THREADS", "8"))
os.environ["dramatiq_queue_prefetch"] = str(THREADS)  # noqa: SIM112 - dramatiq spells it so

import dramatiq  # noqa: E402 - reads dramatiq_queue_prefetch at import
from dramatiq.brokers.rabbitmq import RabbitmqBroker  # noqa: E402

from benchmarks.workloads import poll_loop  # noqa: E402

_url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
_heartbeat = os.environ.get("BENCH_HEARTBEAT")
if _heartbeat:
    _url += ("&" if "?" in _url else "?") + f"heartbeat={_heartbeat}"
broker = RabbitmqBroker(url=_url)
dramatiq.set_broker(broker)
stopping = threading.Event()


@dramatiq.actor(queue_name=QUEUE, time_limit=2**31 - 1, max_retries=0)
def infinite(key: str) -> None:
    """Run until the worker stops."""
    poll_loop(key, stopping.is_set)


def main() -> None:
    """Run one worker process until SIGTERM/SIGINT."""
    from dramatiq import Worker

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    worker = Worker(broker, worker_threads=args.threads, worker_timeout=1000)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    worker.start()
    print("ready", flush=True)
    done.wait()
    stopping.set()
    worker.stop(timeout=5000)


if __name__ == "__main__":
    main()
