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


POOL_WITH_CUDA_FORBIDDEN = """
import cuda_forbidden
import torch
from crepa.experiment import workers

def probe(job):
    import probing_library  # what a job imports initialises CUDA, as it may in a worker
    return job, torch.cuda.is_available(), cuda_forbidden.INITIALISED

if __name__ == "__main__":
    workers.WORKER_MODULES = ("cuda_forbidden", "probing_library", *workers.WORKER_MODULES)
    print(workers.worker_context().get_start_method())
    with workers.worker_pool(2, threads=1) as pool:
        print(workers.run_jobs(pool, probe, [0, 1, 2], "test", progress=False))
"""

# As bitsandbytes does when imported on a GPU machine (it reads each device's compute capability), and
# diffusers and peft import it when it is installed.
PROBING_LIBRARY = "import torch\nif torch.cuda.is_available():\n    torch.cuda.init()\n"


def test_worker_pool_on_a_gpu_machine_never_initialises_cuda_before_forking(tmp_path) -> None:
    """With a GPU visible, a library that initialises CUDA when imported (as bitsandbytes does) and
    every heavy module are imported with CUDA initialisation forbidden in this process and in any fork
    server; the pool must still run its jobs, and each worker may initialise CUDA itself. A fork server
    that preloads them initialises CUDA and fails here."""
    (tmp_path / "probing_library.py").write_text(PROBING_LIBRARY)
    script = tmp_path / "pool.py"
    script.write_text(POOL_WITH_CUDA_FORBIDDEN)
    tests_dir = os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), tests_dir, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    method, jobs = result.stdout.strip().splitlines()[-2:]
    assert method == "spawn"
    assert jobs == "[(0, True, True), (1, True, True), (2, True, True)]"


def test_importing_crepa_never_initialises_cuda() -> None:
    """Every module of crepa imports with CUDA initialisation forbidden (and no NVML shortcut)."""
    code = (
        "import cuda_forbidden, importlib, pkgutil, crepa\n"
        "names = [m.name for m in pkgutil.walk_packages(crepa.__path__, 'crepa.') if not m.name.endswith('__main__')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 50
