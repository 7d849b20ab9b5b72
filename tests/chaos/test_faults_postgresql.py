"""The chaos faults on a fleet on PostgreSQL alone: the manager, the servers and the
test's client talk through the ``postgresql`` transport (each server through its own
silent proxy to PostgreSQL), the storage is the same PostgreSQL. The tests are
``test_faults.py``'s own, run unchanged with the same ledger and checker; only the
cluster differs. Bounds: ``docs/reliability.md`` ("A fleet on PostgreSQL alone").

Quick ones run in the default suite; the PostgreSQL restarts (they stop the shared
database for everyone) and the longer ones are ``slow``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos import test_faults as faults
from tests.chaos.harness import ChaosCluster, Timings

pytestmark = [pytest.mark.postgresql]


@pytest.fixture
async def chaos(tmp_path: Path) -> AsyncIterator[ChaosCluster]:
    """A started cluster on PostgreSQL alone, closed (and its schema dropped) after."""
    cluster = ChaosCluster(tmp_path, Timings(), transport="postgresql")
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.close()


async def test_pg_kill_9(chaos: ChaosCluster) -> None:
    """``test_faults.test_kill_9_a_server_its_jobs_run_again_elsewhere_once_each``."""
    await faults.test_kill_9_a_server_its_jobs_run_again_elsewhere_once_each(chaos)


async def test_pg_silent_partition(chaos: ChaosCluster) -> None:
    """``test_faults.test_silent_partition_the_server_fences_itself_before_the_broker_reassigns``."""
    await faults.test_silent_partition_the_server_fences_itself_before_the_broker_reassigns(chaos)


async def test_pg_sigstop_past_the_fence(chaos: ChaosCluster) -> None:
    """``test_faults.test_sigstop_past_the_heartbeat_timeout_then_sigcont_no_two_copies``."""
    await faults.test_sigstop_past_the_heartbeat_timeout_then_sigcont_no_two_copies(chaos)


async def test_pg_creates_and_cancels_during_kill(chaos: ChaosCluster) -> None:
    """``test_faults.test_creates_and_cancels_during_a_server_kill_are_honoured``."""
    await faults.test_creates_and_cancels_during_a_server_kill_are_honoured(chaos)


async def test_pg_manager_kill(chaos: ChaosCluster) -> None:
    """``test_faults.test_manager_kill_9_jobs_keep_running_new_jobs_start_and_the_view_catches_up``."""
    await faults.test_manager_kill_9_jobs_keep_running_new_jobs_start_and_the_view_catches_up(chaos)


@pytest.mark.slow
async def test_pg_sigterm(chaos: ChaosCluster) -> None:
    """``test_faults.test_sigterm_a_server_hands_its_jobs_over_with_no_loss``."""
    await faults.test_sigterm_a_server_hands_its_jobs_over_with_no_loss(chaos)


@pytest.mark.slow
async def test_pg_postgresql_restart(chaos: ChaosCluster) -> None:
    """``test_faults.test_broker_restart_every_job_runs_again_once``."""
    await faults.test_broker_restart_every_job_runs_again_once(chaos)


@pytest.mark.slow
async def test_pg_postgresql_restart_then_kill_9(chaos: ChaosCluster) -> None:
    """``test_faults.test_postgresql_restart_servers_are_unaffected_and_no_status_is_lost``."""
    await faults.test_postgresql_restart_servers_are_unaffected_and_no_status_is_lost(chaos)


@pytest.mark.slow
async def test_pg_at_capacity(chaos: ChaosCluster) -> None:
    """``test_faults.test_at_capacity_jobs_wait_through_kill_9_and_rebalance_and_no_server_exceeds_it``."""
    await faults.test_at_capacity_jobs_wait_through_kill_9_and_rebalance_and_no_server_exceeds_it(
        chaos
    )


async def test_pg_pause_resume_and_checkpoints_through_kill_9_and_partition(
    chaos: ChaosCluster,
) -> None:
    """``test_faults.test_pause_resume_and_checkpoints_through_kill_9_and_a_partitioned_old_owner``:
    I8 and I9 on PostgreSQL alone."""
    await faults.test_pause_resume_and_checkpoints_through_kill_9_and_a_partitioned_old_owner(chaos)


async def test_pg_pause_resume_and_checkpoints_through_a_rebalance(chaos: ChaosCluster) -> None:
    """``test_faults.test_pause_resume_and_checkpoints_through_a_rebalance``: I8 and I9 on
    PostgreSQL alone."""
    await faults.test_pause_resume_and_checkpoints_through_a_rebalance(chaos)


async def test_pg_update_restart_through_kill_9(chaos: ChaosCluster) -> None:
    """``test_faults.test_an_update_restarts_the_job_once_with_the_new_argument_also_through_kill_9``."""
    await faults.test_an_update_restarts_the_job_once_with_the_new_argument_also_through_kill_9(
        chaos
    )
