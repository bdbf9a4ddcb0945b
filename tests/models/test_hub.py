"""Offline / unreachable model hub: every command that loads weights names the network, the id and the
key to set, exits 2, and prints no traceback. The hub is made unreachable either with HF_HUB_OFFLINE=1
or, as on a machine without network, by pointing HF_ENDPOINT at a closed local port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
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
    (root / "prompts.txt").write_text("a red stripe pattern moves left\n")
    return root


NO_MODEL = 'model.pretrained="someorg/no-such-model"'
# Loads the extractors only after training: they are checked before any run trains.
EXPERIMENT = [
    "experiment",
    "run.toml",
    "--variants",
    "none,crepa",
    "--seeds",
    "1",
    "--prompts",
    "prompts.txt",
    "--out",
    "experiment",
    "--no-progress",
]


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
        ([*EXPERIMENT, "--metrics", "subject_consistency"], "facebook/dino-vitb16", "--extractor"),
    ],
)
def test_unreachable_hub_is_named_without_traceback(world, command, hub_id, key):
    result = crepa(command, world, world / "hf-home")
    output = result.stdout + result.stderr
    message = " ".join(output.split())
    assert result.returncode == 2, output[-2000:]
    assert f"cannot reach the model hub and {hub_id} is not in the local cache" in message, message[-2000:]
    assert key in message and "Traceback" not in output
    assert not list(world.glob("experiment/runs/*/training_summary.json"))  # stopped before training


@pytest.mark.parametrize(
    ("command", "value", "expected"),
    [
        (
            ["train", "run.toml"],
            "/no/such/pipe",
            "model.pretrained: {} does not exist (give a local diffusers",
        ),
        (["precompute", "run.toml"], "./no-such-pipe", "model.pretrained: {} does not exist (give a local"),
        (
            ["precompute", "run.toml"],
            "~/no-such-teacher",
            "teacher.name: {} does not exist (give an existing",
        ),
    ],
)
def test_a_missing_local_path_is_named_not_looked_up_on_the_hub(world, command, value, expected):
    key = expected.partition(":")[0]
    result = crepa([*command, "--set", f'{key}="{value}"'], world, world / "hf-home")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert expected.format(value) in " ".join(output.split()), output[-2000:]
    assert "huggingface.co" not in output and "Traceback" not in output


def test_hub_ids_are_not_taken_for_local_paths():
    from crepa.models.hub import looks_local

    hub_ids = ["THUDM/CogVideoX-5b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "facebook/dinov2-small", "gpt2"]
    assert not any(looks_local(name) for name in hub_ids)
    assert all(looks_local(name) for name in ["/nope", "./nope", "../nope", "~/nope", "~", "runs/a/pipe"])


def closed_port() -> int:
    """A local TCP port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs the real command in a subprocess and reports the seconds it took after the imports of
# `crepa.cli` (the part a retry loop would lengthen), on stderr after everything else.
TIMED_COMMAND = """
import sys, time
from crepa.cli import app
start = time.perf_counter()
try:
    app(sys.argv[1:], prog_name="crepa")
finally:
    print(f"command seconds: {time.perf_counter() - start:.2f}", file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("command", "hub_id", "key"),
    [
        (["train", "run.toml", "--set", NO_MODEL], "someorg/no-such-model", "model.pretrained"),
        (["precompute", "run.toml", "--set", NO_MODEL], "someorg/no-such-model", "model.pretrained"),
        (
            ["precompute", "run.toml", "--set", 'teacher.name="someorg/no-such-teacher"'],
            "someorg/no-such-teacher",
            "teacher.name",
        ),
        (
            ["eval", "videos", "--out", "eval", "--metrics", "subject_consistency"],
            "facebook/dino-vitb16",
            "--extractor",
        ),
        ([*EXPERIMENT, "--metrics", "subject_consistency"], "facebook/dino-vitb16", "--extractor"),
    ],
)
def test_without_network_every_command_answers_at_once_with_exit_2(world, command, hub_id, key):
    """No HF_HUB_OFFLINE: the hub endpoint refuses connections, as without network. One quick check,
    no retries with backoff, no library warning before the message, exit 2 naming the key."""
    env = {
        **os.environ,
        "HF_HOME": str(world / "hf-home"),  # an empty cache
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "PYTHONWARNINGS": "default",  # every warning would show
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", TIMED_COMMAND, *command],
        cwd=world,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    message = " ".join(output.split())
    assert f"cannot reach the model hub and {hub_id} is not in the local cache" in message, output[-3000:]
    assert key in message and "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: cannot reach the model hub"), output[-3000:]  # nothing before it
    assert "Retry" not in output and "Warning" not in output, output[-3000:]
    seconds = float(re.search(r"command seconds: ([\d.]+)", result.stderr).group(1))
    # a few seconds alone; hub retries with backoff would take tens of seconds (and print "Retry", refused
    # above); 20 s leaves room for a machine shared with other jobs
    assert seconds < 20.0, output[-3000:]


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
    assert result.returncode == 2, output[-2000:]
    assert f"cannot reach the model hub and {hub_id} is not in the local cache" in message, message[-2000:]
    assert "model.pretrained" in message and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_check_loadable_reads_the_cache_only(tmp_path, monkeypatch):
    """Offline, a hub id passes when the cache holds its entry file (laid out as huggingface_hub does),
    fails naming the key when it does not; a local folder always passes."""
    from huggingface_hub import constants

    from crepa.models.hub import HubUnreachableError, check_loadable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub/models--someorg--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0" * 40)
    (repo / f"snapshots/{'0' * 40}").mkdir(parents=True)
    (repo / f"snapshots/{'0' * 40}/config.json").write_text("{}")
    check_loadable("someorg/cached", "--extractor dino:FOLDER", "config.json")
    check_loadable(str(tmp_path), "model.pretrained", "model_index.json")
    with pytest.raises(
        HubUnreachableError, match=r"someorg/cached is not in the local cache.*model\.pretrained"
    ):
        check_loadable("someorg/cached", "model.pretrained", "model_index.json")


def test_experiment_checks_the_sampling_pipeline_before_any_work(world, tmp_path, monkeypatch):
    """Sampling loads model.pretrained's whole pipeline after training (precompute may find its cache
    built and load nothing): an uncached hub id stops the experiment while it prepares."""
    from huggingface_hub import constants

    from crepa.experiment.runfiles import parse_variants
    from crepa.experiment.runner import CrepaEvaluator, ExperimentSpec, prepare
    from crepa.models.hub import HubUnreachableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty
    variants, shared = parse_variants("none,crepa", [NO_MODEL])
    spec = ExperimentSpec(
        run_file=world / "run.toml",
        out=tmp_path / "experiment",
        variants=variants,
        seeds=(0,),
        prompts=("a red stripe pattern",),
        reference=None,
        evaluator=CrepaEvaluator(metrics_requested=("temporal_flickering",)),
        shared_overrides=shared,
    )
    with pytest.raises(
        HubUnreachableError, match=r"someorg/no-such-model is not in the local cache.*model\.pretrained"
    ):
        prepare(spec)
