"""What signing every message costs OrchestratR: failover after ``kill -9`` and start
latency, with and without a fleet key, taking turns within each round on the same
broker and machine (so the ratio compares like with like).

    .venv/bin/python -m benchmarks.signing                 # 3 rounds, 1,000 jobs
    .venv/bin/python -m benchmarks.signing --runs 5 --per-worker 250 --samples 100

Failover: four servers with ``--per-worker`` jobs each (1,000 jobs in the fleet by
default), the one holding the most is killed; seconds until all its jobs run again.
Latency: ms from ``create_job`` to the job function's first line on an idle server
(median of ``--samples`` jobs per run). Writes ``benchmarks/results/signing.json``
and prints the medians and the signed/unsigned ratios.
"""

from __future__ import annotations

from benchmarks.paired import run

SUBJECTS = ("orchestratr", "orchestratr-signed")


def main() -> None:
    run("signing", "signing", SUBJECTS, __doc__ or "", "signed / unsigned")


if __name__ == "__main__":
    main()
