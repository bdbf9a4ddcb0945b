"""Imported first (by a fork server's preload, or a fresh interpreter): torch's CUDA queries answer as
on a machine with one GPU, except that every call which initialises CUDA, or runs ``cuInit`` and so
poisons later forks (``cudaGetDeviceCount``), raises in a process that may fork workers (a main
process or a fork server). In a worker it is allowed and only recorded (``INITIALISED``), as a
worker may use its GPU. NVML still answers, as it does on a GPU machine. Used to show that crepa's
imports and its worker pool never initialise CUDA in a process that forks workers (on a GPU machine
that made every worker fail with "Cannot re-initialize CUDA in forked subprocess")."""

import functools
import multiprocessing

import torch

INITIALISED = False  # whether this worker process initialised CUDA


class CudaInitialised(RuntimeError):
    pass


def _forbidden(*args, **kwargs) -> int:
    """Refused in a main process or fork server; in a worker, recorded (and one device counted)."""
    if multiprocessing.current_process().name == "MainProcess":
        raise CudaInitialised("CUDA initialised (or cuInit run) in a process that forks workers")
    global INITIALISED
    INITIALISED = True
    return 1


def _as_cuda_build(query):
    """torch's own query, run as a CUDA build runs it, whose ``cudaGetDeviceCount`` raises (only for
    the query: the rest of this CPU build's imports keep their CPU code paths; torch takes the
    presence of that binding as "compiled with CUDA"). A CUDA build keeps its own binding in a main
    process (diffusers' import asks it, through ``torch.accelerator``), but a worker counts one device
    even where none is visible (no GPU, or CUDA_VISIBLE_DEVICES="" as in the default suite)."""

    @functools.wraps(query)
    def run(*args, **kwargs):
        own = getattr(torch._C, "_cuda_getDeviceCount", None)
        in_worker = multiprocessing.current_process().name != "MainProcess"
        if own is _forbidden or (own is not None and not in_worker):  # nested, or a CUDA build's main
            return query(*args, **kwargs)
        torch._C._cuda_getDeviceCount = _forbidden
        try:
            return query(*args, **kwargs)
        finally:
            if own is None:
                del torch._C._cuda_getDeviceCount
            else:
                torch._C._cuda_getDeviceCount = own

    return run


torch.cuda._device_count_nvml = lambda: 1  # what NVML reports on a one-GPU machine
torch.cuda.is_available = _as_cuda_build(torch.cuda.is_available)
torch.cuda.device_count = _as_cuda_build(torch.cuda.device_count)
torch.cuda._lazy_init = _forbidden
torch.cuda.init = _forbidden
