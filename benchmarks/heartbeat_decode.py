"""Time ``protocol.decode`` of one large heartbeat (best of 15): the cost of the
codec's bounds checks on the manager's hottest path (docs/reliability.md).

    .venv/bin/python benchmarks/heartbeat_decode.py [--jobs 20000]
"""

from __future__ import annotations

import argparse
import time

from orchestratr_core import protocol as p
from orchestratr_core.job import new_id


def main() -> None:
    """Print the best decode time of a heartbeat carrying ``--jobs`` jobs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    jobs = parser.parse_args().jobs
    heartbeat = p.ServerHeartbeat(
        server_id=new_id(),
        name="bench",
        max_workers=jobs,
        started_at=1.0,
        sent_at=2.0,
        jobs=tuple(p.RunningJob(new_id(), (3 << 32) | 2, 1.7e9, 1) for _ in range(jobs)),
    )
    data = p.encode(heartbeat)
    best = float("inf")
    for _ in range(15):
        started = time.perf_counter()
        p.decode(data)
        best = min(best, time.perf_counter() - started)
    print(f"decode of a {jobs:,}-job heartbeat ({len(data):,} bytes): {best * 1000:.1f} ms")


if __name__ == "__main__":
    main()
