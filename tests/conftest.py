"""Test-wide settings: never contact a model hub (every model here is built from a config), and run
the default suite on the CPU even where CUDA exists.

The default suite compares numbers across runs, processes and CPU references, and starts several
processes on one machine (gloo groups, worker pools); on a GPU machine each of them would otherwise
pick the GPU (bf16 weights, NCCL). So unless the GPU suite is selected (``pytest -m gpu``), CUDA is
hidden from this process and every process it starts, before anything asks torch for a device. The
GPU paths are the GPU suite's (tests marked ``gpu``, skipped without CUDA)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    if "gpu" not in (config.getoption("markexpr") or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:  # cuBLAS picks deterministic kernels only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
