"""Test-wide settings and fixtures. No test contacts a model hub (every model here is built from a
config); the shared pieces are :mod:`helpers` (this folder is on ``sys.path`` through this file)."""

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import helpers


@pytest.fixture
def tiny_world(tmp_path: Path):
    """``tiny_world(family, clips=4, **run_options)`` writes the one tiny world (tiny pipeline, tiny
    DINOv2, clips, run file) into this test's ``tmp_path`` and returns the run file."""
    return functools.partial(helpers.write_world, tmp_path)


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=None, env=None, timeout=600)``: ``python -m crepa ARGS`` in a real process."""
    return helpers.run_cli
