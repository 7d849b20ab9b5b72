"""What four job kinds cost OrchestratR: failover after ``kill -9`` and start
latency, one kind (the default pool: one jobs queue) against four kinds (four
pools: four quorum queues, four consumers per server), taking turns within each
round on the same broker and machine (so the ratio compares like with like).

    .venv/bin/python -m benchmarks.kinds                 # 3 rounds, 1,000 jobs
    .venv/bin/python -m benchmarks.kinds --runs 5 --per-worker 250 --samples 100

Failover: four servers with ``--per-worker`` jobs each (1,000 jobs in the fleet by
default), the one holding the most is killed; seconds until all its jobs run again.
Latency: ms from ``create_job`` to the job function's first line on an idle server
(median of ``--samples`` jobs per run). Writes ``benchmarks/results/kinds.json``
and prints the medians and the four-kinds/one-kind ratios.
"""

from __future__ import annotations

from benchmarks.paired import run

SUBJECTS = ("orchestratr", "orchestratr-kinds4")


def main() -> None:
    run("kinds", "kinds", SUBJECTS, __doc__ or "", "four kinds / one kind")


if __name__ == "__main__":
    main()
