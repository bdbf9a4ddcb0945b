"""`crepa train` end to end on tiny saved pipelines: precompute -> train -> checkpoint -> resume ->
the LoRA loads into the family's pipeline; exact resume after SIGKILL; two processes under accelerate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from crepa.config import load_config
from crepa.io.video import write_video
from crepa.models.tiny_pipelines import save_tiny_pipeline
from crepa.precompute import precompute
from crepa.train.recipe import train

# family -> (frames, height, width) of the clips: valid 1 + r*m counts and multiples of VAE stride x patch
SHAPES = {"wan": (9, 32, 32), "cogvideox": (9, 32, 32), "hunyuanvideo": (9, 32, 32), "ltx_video": (9, 64, 64)}
WORDS = ["red", "blue", "green", "yellow"]


def write_clips(directory: Path, count: int, frames: int, height: int, width: int) -> None:
    """Moving stripes, one colour per clip, with captions."""
    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(frames)[:, None, None]
    x = np.arange(width)[None, None, :]
    for i in range(count):
        stripes = ((x + 3 * (i + 1) * t) % 16 < 8).astype(np.uint8) * 200
        clip = np.zeros((frames, height, width, 3), np.uint8)
        clip[..., i % 3] = np.broadcast_to(stripes, (frames, height, width))
        write_video(directory / f"clip{i}.mp4", clip, fps=8)
        (directory / f"clip{i}.txt").write_text(f"a {WORDS[i % 4]} stripe pattern moves left")


def write_world(root: Path, family: str, clips: int = 4) -> Path:
    """Tiny pipeline, tiny DINOv2, clips and a run file; returns the run file."""
    frames, height, width = SHAPES[family]
    save_tiny_pipeline(family, root / "pipe")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56
    )
    Dinov2Model(config).save_pretrained(root / "dino")
    write_clips(root / "clips", clips, frames, height, width)
    run = root / "run.toml"
    run.write_text(
        f"""
[model]
pretrained = "pipe"
gradient_checkpointing = true
[data]
source = "clips"
resolutions = [[{height}, {width}]]
num_frames = [{frames}]
[cache]
dir = "cache"
[teacher]
name = "dino"
[crepa]
block_index = 0
weight = 0.5
projector_hidden_dim = 64
[lora]
rank = 4
alpha = 4
[train]
max_steps = 4
batch_size = 2
checkpoint_every = 2
timestep_sampling = "uniform"
[logging]
every = 1
tensorboard = false
[validation]
prompts = ["a red stripe pattern"]
num_frames = {frames}
height = {height}
width = {width}
inference_steps = 2
[output]
dir = "out"
"""
    )
    return run


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", list(SHAPES))
def test_precompute_train_resume_and_load_lora(tmp_path, family):
    run = write_world(tmp_path, family)
    precompute(load_config(run), progress=False)
    first = train(load_config(run, ["train.max_steps=2"]), progress=False)
    assert first.steps == 2 and (tmp_path / "out/checkpoints/step-000002/trainable.safetensors").is_file()
    config = load_config(run, ["validation.every=4"])
    summary = train(config, resume="latest", progress=False)
    assert summary.steps == 4 and summary.skipped_nonfinite == 0
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert np.isfinite(losses(tmp_path / "out")).all() and len(losses(tmp_path / "out")) == 4
    assert summary.final_metrics["crepa/weight"] == 0.5
    # the LoRA loads into the family's own pipeline with the trained weights
    pipeline_class = getattr(diffusers, type_of_pipeline(tmp_path / "pipe"))
    pipeline = pipeline_class.from_pretrained(tmp_path / "pipe")
    pipeline.load_lora_weights(tmp_path / "out")
    lora = {n: p for n, p in pipeline.transformer.named_parameters() if "lora_B" in n}
    assert lora and len(lora) == len(load_file(tmp_path / "out/pytorch_lora_weights.safetensors")) // 2
    assert any(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at zero: these are trained values
    validation = tmp_path / "out/validation/step-000004"
    assert (validation / "prompt-0.mp4").stat().st_size > 0 and (
        validation / "contact_sheet.png"
    ).stat().st_size > 0
    summary_file = json.loads((tmp_path / "out/training_summary.json").read_text())
    assert summary_file["steps"] == 4 and summary_file["config"]["crepa"]["block_index"] == 0


def set_wan_layers(pipe: Path, num_layers: int) -> None:
    """Replace the tiny Wan pipeline's transformer with a fresh one of ``num_layers`` blocks (seed 0)."""
    config = diffusers.WanTransformer3DModel.load_config(pipe / "transformer")
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel.from_config({**config, "num_layers": num_layers}).save_pretrained(
        pipe / "transformer"
    )


def type_of_pipeline(directory: Path) -> str:
    return json.loads((directory / "model_index.json").read_text())["_class_name"]


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "crepa", *args], cwd=cwd, env=env, **kwargs)


def test_exact_resume_after_sigkill(tmp_path):
    run = write_world(tmp_path, "wan")
    precompute(load_config(run), progress=False)
    steps = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--no-progress"]
    straight = run_cli(["train", str(run), *steps, "--set", 'output.dir="straight"'], tmp_path)
    assert straight.wait(timeout=600) == 0
    killed = run_cli(["train", str(run), *steps, "--set", 'output.dir="killed"'], tmp_path)
    checkpoint = tmp_path / "killed/checkpoints/step-000003"
    deadline = time.monotonic() + 600
    while not checkpoint.is_dir() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.is_dir() and not (tmp_path / "killed/training_summary.json").exists()
    resumed = run_cli(
        ["train", str(run), *steps, "--set", 'output.dir="killed"', "--resume", "latest"], tmp_path
    )
    assert resumed.wait(timeout=600) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_stay_in_sync(tmp_path):
    run = write_world(tmp_path, "wan")
    precompute(load_config(run), progress=False)
    with socket.socket() as probe:  # a free port: another job on the machine may hold the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--main_process_port", str(port)),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "crepa", "train", str(run)),
        *("--set", "train.max_steps=2", "--set", "train.batch_size=1", "--no-progress"),
    ]
    bindir = Path(sys.executable).parent
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/training_summary.json").read_text())
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [p.name for p in (tmp_path / "out/checkpoints").iterdir()] == ["step-000002"]


def test_repvideo_with_crepa_trains_and_resumes_exactly(tmp_path):
    run = write_world(tmp_path, "wan")
    set_wan_layers(tmp_path / "pipe", 4)  # so that with window 2 blocks 2 and 3 are gated
    precompute(load_config(run), progress=False)
    rep = ["repvideo.enabled=true", "repvideo.window=2", "repvideo.gate_init=0.5", "repvideo.lr=0.01"]
    straight = load_config(run, [*rep, 'output.dir="straight"'])
    train(straight, progress=False)
    train(load_config(run, [*rep, 'output.dir="split"', "train.max_steps=2"]), progress=False)
    train(load_config(run, [*rep, 'output.dir="split"']), resume="latest", progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    gates = load_file(tmp_path / "straight/repvideo_gates.safetensors")["gate"]
    assert torch.equal(gates, load_file(tmp_path / "split/repvideo_gates.safetensors")["gate"])
    # window 2: the cache restarts after blocks 0 and 2, so only block 2 averages two tensors (h0, h1)
    gated = [i >= 2 and (i - 1) % 2 != 0 for i in range(4)]
    assert gated == [False, False, True, False]
    assert [bool(g != 0.5) for g in gates] == gated  # ungated gates get no gradient and no decay


@pytest.fixture(scope="module")
def wan_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan-world")
    run = write_world(root, "wan")
    precompute(load_config(run), progress=False)
    return run


@pytest.mark.parametrize(
    ("name", "overrides", "outputs"),
    [
        ("full", ["lora.enabled=false"], ["transformer/config.json", "projector.safetensors"]),
        (
            "backbone",
            ['crepa.mode="backbone"', "crepa.teacher_block_index=1"],
            ["pytorch_lora_weights.safetensors"],
        ),
        ("pixels", ['cache.teacher_source="pixels"'], ["projector.safetensors"]),
        ("vae", ['cache.teacher_source="vae"'], ["projector.safetensors"]),
        ("baseline", ["crepa.enabled=false"], ["pytorch_lora_weights.safetensors"]),
    ],
)
def test_training_variants_run(wan_world, name, overrides, outputs):
    config = load_config(wan_world, [*overrides, "train.max_steps=1", f'output.dir="{name}"'])
    summary = train(config, progress=False)
    assert summary.steps == 1 and np.isfinite(summary.final_metrics["loss/total"])
    assert ("crepa/score" in summary.final_metrics) == (name != "baseline")
    for output in outputs:
        assert (config.output.dir / output).is_file(), output
    assert (name == "baseline") == (not (config.output.dir / "projector.safetensors").exists())
