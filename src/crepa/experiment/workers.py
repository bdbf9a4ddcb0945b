"""Independent jobs (fine-tuning runs, evaluations) on a pool of single-threaded worker processes.

Tiny models gain little from intra-op threads, and OpenMP threads spin badly when other
processes share the cores; one thread per process and one process per core uses a small machine
best. Each job is deterministic on its own, so the order in which workers finish changes nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

Job = TypeVar("Job")


def quiet_libraries() -> None:
    """Keep the terminal to the demo's own progress: no per-load bars or notices from the libraries."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*no supported trackers are currently installed.*")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (e.g. a stage that has the machine to itself)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_libraries()


# What every job imports (torch, diffusers, transformers, peft through these): 6-9 s of CPU per process.
WORKER_MODULES = ("crepa.experiment.runner", "crepa.train.recipe", "crepa.generation", "crepa.eval.evaluate")


def worker_context() -> multiprocessing.context.BaseContext:
    """How workers start. Without a GPU: from a fork server that imported :data:`WORKER_MODULES` once,
    so each worker starts with them loaded. With one (or where there is no fork server, e.g. Windows):
    spawned, each worker importing what its jobs need. Never a plain fork of this process: forking
    after OpenMP / torch threads have started can hang.

    Why not the fork server with a GPU: a process that has initialised CUDA marks its forks as unable
    to use it ("Cannot re-initialize CUDA in forked subprocess"), and some libraries initialise CUDA
    when they are imported on a GPU machine: bitsandbytes (which diffusers and peft import when it is
    installed) reads every device's compute capability. Preloaded into the fork server, such an
    import would poison every worker. ``torch.cuda.device_count()`` asks NVML first, so choosing
    initialises nothing here either."""
    if torch.cuda.device_count() > 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_MODULES))
    return context


@contextmanager
def worker_pool(workers: int, threads: int) -> Iterator[Executor | None]:
    """A process pool of ``workers`` (None for one worker: jobs run in this process)."""
    if workers <= 1:
        yield None
        return
    context = worker_context()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=init_worker, initargs=(threads,)
    ) as pool:
        yield pool


def run_jobs(
    pool: Executor | None,
    function: Callable[[Job], Any],
    jobs: Sequence[Job],
    description: str,
    progress: bool = True,
) -> list[Any]:
    """``[function(job) for job in jobs]``, on ``pool`` when given, with a progress bar over jobs."""
    results: list[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=description, unit="job", disable=not progress) as bar:
        if pool is None:
            for index, job in enumerate(jobs):
                results[index] = function(job)
                bar.update(1)
            return results
        futures = {pool.submit(function, job): index for index, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        except BaseException:  # a failed job or Ctrl-C: start no more jobs (running ones finish)
            for future in futures:
                future.cancel()
            raise
    return results
