"""Offline / unreachable model hub: every command that loads weights names the network, the id and the
key to set, exits 1, and prints no traceback (HF_HUB_OFFLINE=1 makes the hub unreachable here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crepa.io.video import write_video
from test_train import write_world


def crepa(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}  # an empty cache
    return subprocess.run(
        [sys.executable, "-m", "crepa", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    write_world(root, "wan")
    write_video(root / "videos/a.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=8)
    return root


@pytest.mark.parametrize(
    ("command", "hub_id", "key"),
    [
        (
            ["precompute", "run.toml", "--set", 'model.pretrained="THUDM/CogVideoX-5b"'],
            "THUDM/CogVideoX-5b",
            "model.pretrained",
        ),
        (
            ["precompute", "run.toml", "--set", 'teacher.name="facebook/dinov2-giant"'],
            "facebook/dinov2-giant",
            "teacher.name",
        ),
        (
            ["train", "run.toml", "--set", 'model.pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"'],
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            "model.pretrained",
        ),
        (
            ["eval", "videos", "--out", "eval", "--metrics", "subject_consistency"],
            "facebook/dino-vitb16",
            "--extractor",
        ),
    ],
)
def test_unreachable_hub_is_named_without_traceback(world, command, hub_id, key):
    result = crepa(command, world, world / "hf-home")
    output = result.stdout + result.stderr
    message = " ".join(output.split())
    assert result.returncode == 1, output[-2000:]
    assert f"cannot reach the model hub and {hub_id} is not in the local cache" in message, message[-2000:]
    assert key in message and "Traceback" not in output
