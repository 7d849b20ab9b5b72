"""The Celery side of the benchmarks: one "infinite" task on RabbitMQ, configured
as Celery's documentation recommends for long-running tasks.

Settings (all written to the results JSON by ``peers.celery_settings``):

* ``task_acks_late = True`` — the message is acknowledged when the task ends, so a
  dead worker's tasks go back to the queue;
* ``task_reject_on_worker_lost = True`` — a task whose worker process died is
  requeued, not acknowledged;
* ``worker_prefetch_multiplier = 1`` — a worker reserves only as many messages as
  it has pool slots (here: concurrency), never more;
* pool ``threads`` with ``--concurrency`` = the jobs one worker may hold
  (the prefork pool would need one process per infinite task);
* ``broker_heartbeat`` from ``BENCH_HEARTBEAT`` (Celery's default is 120 s);
* ``--without-gossip --without-mingle --without-heartbeat`` (worker-to-worker
  chatter a job queue does not need);
* the queue is a quorum queue (``x-queue-type: quorum``; Celery >= 5.5 then
  disables global QoS itself), as OrchestratR's jobs queue;
* ``worker_cancel_long_running_tasks_on_connection_loss = True`` — Celery's own
  answer to the duplicate-on-reconnect problem (Celery #6760).

The task sleeps ``BENCH_POLL_SLEEP`` s at a time and checks the worker's revoked
set (``celery.control.revoke(id)`` reaches it; the threads pool cannot terminate
a running task).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.worker import state as worker_state
from kombu import Queue

from benchmarks.workloads import poll_loop

QUEUE = os.environ.get("BENCH_QUEUE", "bench-celery")
QUEUE_TYPE = os.environ.get("BENCH_QUEUE_TYPE", "quorum")


def make_app(url: str, queue: str, heartbeat: int, queue_type: str = "quorum") -> Celery:
    """A Celery app with the benchmark's settings (workers and the publisher alike)."""
    celery = Celery("bench", broker=url)
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_heartbeat=heartbeat,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=queue,
        task_queues=[Queue(queue, routing_key=queue, queue_arguments={"x-queue-type": queue_type})],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        result_backend=None,
    )
    return celery


app = make_app(
    os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    QUEUE,
    int(os.environ.get("BENCH_HEARTBEAT", "120")),
    QUEUE_TYPE,
)


@app.task(name="bench.infinite", bind=True)
def infinite(self, key: str) -> None:  # type: ignore[no-untyped-def]
    """Run until revoked."""
    task_id = self.request.id
    poll_loop(key, lambda: task_id in worker_state.revoked)
