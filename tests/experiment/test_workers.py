"""The worker pool of ``crepa experiment`` / ``crepa demo``: results in job order, one torch thread per
worker, and workers that start with the heavy modules already imported (paid once, in the fork server)."""

import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from crepa.experiment.workers import WORKER_MODULES, run_jobs, worker_pool


def describe_worker(job: int) -> tuple[int, int, int, list[str]]:
    """(job, pid, torch threads, which of WORKER_MODULES were imported before the job ran)."""
    return job, os.getpid(), torch.get_num_threads(), [name for name in WORKER_MODULES if name in sys.modules]


@pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(),
    reason="no fork server here (spawned workers)",
)
def test_two_workers_return_results_in_job_order_with_modules_preloaded() -> None:
    jobs = list(range(6))
    with worker_pool(2, threads=1) as pool:
        assert pool is not None
        results = run_jobs(pool, describe_worker, jobs, "test", progress=False)
    assert [job for job, *_ in results] == jobs
    pids = {pid for _, pid, _, _ in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(threads == 1 for _, _, threads, _ in results)
    # This module imports none of them (checked in a fresh interpreter by the next test), so only the
    # fork server's preload can have imported them before the job ran.
    assert all(preloaded == list(WORKER_MODULES) for *_, preloaded in results)


def test_one_worker_runs_jobs_in_this_process() -> None:
    with worker_pool(1, threads=1) as pool:
        assert pool is None
        results = run_jobs(pool, describe_worker, [0, 1], "test", progress=False)
    assert {pid for _, pid, _, _ in results} == {os.getpid()}


def test_this_module_does_not_import_the_worker_modules_itself() -> None:
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_workers; "
    code += "from crepa.experiment.workers import WORKER_MODULES; "
    code += "print([name for name in WORKER_MODULES if name in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
