"""Test-wide settings and fixtures. No test contacts a model hub (every model here is built from a
config); the shared pieces are :mod:`helpers` (this folder is on ``sys.path`` through this file).

The default suite runs on the CPU even where CUDA exists: it compares numbers across runs, processes
and CPU references, and starts several processes on one machine (gloo groups, worker pools); on a GPU
machine each of them would otherwise pick the GPU (bf16 weights, NCCL). So unless the GPU suite is
selected (``pytest -m gpu``), CUDA is hidden from this process and every process it starts, before
anything asks torch for a device. The GPU paths are the GPU suite's (``tests/gpu``, marked ``gpu``,
skipped without CUDA)."""

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny_world(tmp_path: Path):
    """``tiny_world(family, clips=4, **run_options)`` writes the one tiny world (tiny pipeline, tiny
    DINOv2, clips, run file) into this test's ``tmp_path`` and returns the run file."""
    import helpers  # not at the top: importing diffusers runs cuInit, which must wait for pytest_configure

    return functools.partial(helpers.write_world, tmp_path)


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=None, env=None, timeout=600)``: ``python -m crepa ARGS`` in a real process."""
    import helpers

    return helpers.run_cli


def pytest_configure(config: pytest.Config) -> None:
    if "gpu" not in (config.getoption("markexpr") or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:  # cuBLAS picks deterministic kernels only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
