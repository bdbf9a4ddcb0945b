"""Offline / unreachable model hub: every command that loads weights names the network, the id and the
key to set, exits 1, and prints no traceback (HF_HUB_OFFLINE=1 makes the hub unreachable here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from crepa.io.video import write_video
from helpers import run_cli, write_world


def crepa(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}  # an empty cache
    return run_cli(*args, cwd=cwd, env=env, timeout=300)


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


@pytest.mark.parametrize("export_format", ["comfyui", "merged"])
def test_export_names_the_unreachable_hub(world, tmp_path, export_format):
    """A run trained from a hub id, exported where that id is neither reachable nor cached."""
    from safetensors.torch import save_file

    from crepa.config import load_config
    from crepa.runs import RUN_CONFIG_FILE
    from crepa.train.lora import LORA_FILE

    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    config = load_config(world / "run.toml", [f'model.pretrained="{hub_id}"', 'model.family="wan"'])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_CONFIG_FILE).write_text(config.model_dump_json(), encoding="utf-8")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, run_dir / LORA_FILE)
    result = crepa(
        ["export", str(run_dir), "--format", export_format, "--out", str(tmp_path / "out")],
        world,
        world / "hf-home",
    )
    output = result.stdout + result.stderr
    message = " ".join(output.split())
    assert result.returncode == 1, output[-2000:]
    assert f"cannot reach the model hub and {hub_id} is not in the local cache" in message, message[-2000:]
    assert "model.pretrained" in message and "Traceback" not in output
    assert not (tmp_path / "out").exists()
