"""What many tests share (this module holds no tests; conftest.py wraps some as fixtures): the one tiny
world (tiny saved pipeline + tiny DINOv2 + clips + a run file), its run file with several data
sources, the CLI in a real subprocess, ``accelerate launch`` of two CPU processes, a two-step LoRA run, and synthetic clips for the metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import diffusers
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from crepa.config import load_config
from crepa.io.video import write_video
from crepa.models.tiny_pipelines import save_tiny_pipeline
from crepa.precompute import precompute
from crepa.train.recipe import train

REPO = Path(__file__).resolve().parents[1]  # the repository root: README, examples, src
EXAMPLES = REPO / "examples"
# tiny pipeline -> (frames, height, width) of its clips: valid 1 + r*m counts and multiples of VAE
# stride x patch; 13 frames give CogVideoX 1.5 4 latent frames and Mochi (6x) 3.
SHAPES = {
    "wan": (9, 32, 32),
    "cogvideox": (9, 32, 32),
    "hunyuanvideo": (9, 32, 32),
    "ltx_video": (9, 64, 64),
    "cogvideox_1_5": (13, 32, 32),
    "cogvideox_i2v": (9, 32, 32),
    "wan_i2v": (9, 32, 32),
    "wan_a14b": (9, 32, 32),  # trains the low-noise expert, transformer_2
    "skyreels_v2": (9, 32, 32),
    "mochi": (13, 32, 32),
    "wan2_2_ti2v": (9, 64, 64),  # 16x spatial compression, patch 2: 2x2 tokens
    "wan_i2v_a14b": (9, 32, 32),  # trains the low-noise expert, transformer_2
}
TRAIN_FAMILIES = ("wan", "cogvideox", "hunyuanvideo", "ltx_video")  # train/test_train.py end to end
IMAGE_TO_VIDEO = {"cogvideox_i2v", "wan_i2v", "wan_i2v_a14b"}
TWO_EXPERTS = {"wan_a14b", "wan_i2v_a14b"}
WORDS = ["red", "blue", "green", "yellow"]
# the run of the support-matrix tests (models/test_families.py): block 1, two steps, validation at step 2
FAMILY_RUN = {"block_index": 1, "max_steps": 2, "gradient_checkpointing": False, "validation_every": 2}


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


def write_world(
    root: Path,
    family: str,
    clips: int = 4,
    *,
    block_index: int = 0,
    max_steps: int = 4,
    gradient_checkpointing: bool = True,
    validation_every: int | None = None,
) -> Path:
    """Tiny pipeline ``family``, tiny DINOv2, ``clips`` clips, a first-frame image for image-to-video
    pipelines, and a run file (CREPA on, LoRA rank 4, validation of one prompt); returns the run file."""
    frames, height, width = SHAPES[family]
    save_tiny_pipeline(family, root / "pipe")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56
    )
    Dinov2Model(config).save_pretrained(root / "dino")
    write_clips(root / "clips", clips, frames, height, width)
    images = ""
    if family in IMAGE_TO_VIDEO:
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, : width // 2, 0] = 200
        Image.fromarray(pixels).save(root / "first.png")
        images = 'images = ["first.png"]'
    run = root / "run.toml"
    run.write_text(
        f"""
[model]
pretrained = "pipe"
{'expert = "transformer_2"' if family in TWO_EXPERTS else ""}
{"gradient_checkpointing = true" if gradient_checkpointing else ""}
[data]
source = "clips"
resolutions = [[{height}, {width}]]
num_frames = [{frames}]
[cache]
dir = "cache"
[teacher]
name = "dino"
[crepa]
block_index = {block_index}
weight = 0.5
projector_hidden_dim = 64
[lora]
rank = 4
alpha = 4
[train]
max_steps = {max_steps}
batch_size = 2
checkpoint_every = 2
timestep_sampling = "uniform"
[logging]
every = 1
tensorboard = false
[validation]
{f"every = {validation_every}" if validation_every else ""}
prompts = ["a red stripe pattern"]
{images}
num_frames = {frames}
height = {height}
width = {width}
inference_steps = 2
[output]
dir = "out"
"""
    )
    return run


def with_sources(run: Path, tables: str) -> Path:
    """The run file with ``data.source`` replaced by ``[[data.sources]]`` tables (TOML text)."""
    run.write_text(run.read_text().replace('source = "clips"\n', "") + tables)
    return run


def two_sources(root: Path, family: str = "wan") -> Path:
    """``clips`` (4 clips, repeats 3, prefix "sks, ") and ``more`` (4 other clips, 5 frames)."""
    run = write_world(root, family)
    frames, height, width = SHAPES[family]
    write_clips(root / "more", 4, frames, height, width)
    return with_sources(
        run,
        """
[[data.sources]]
path = "clips"
repeats = 3
caption_prefix = "sks, "

[[data.sources]]
path = "more"
num_frames = [5]
""",
    )


def set_wan_layers(pipe: Path, num_layers: int) -> None:
    """Replace the tiny Wan pipeline's transformer with a fresh one of ``num_layers`` blocks (seed 0)."""
    config = diffusers.WanTransformer3DModel.load_config(pipe / "transformer")
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel.from_config({**config, "num_layers": num_layers}).save_pretrained(
        pipe / "transformer"
    )


# ---------------------------------------------------------------- processes
def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m crepa ARGS`` in a real process (this interpreter, this PYTHONPATH), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "crepa", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_command(run: Path, *overrides: str, sharded: bool = False, resume: bool = False) -> list[str]:
    """`crepa train` in 2 CPU processes (gloo) under accelerate: DDP, or FSDP2 with the shipped yaml."""
    with socket.socket() as probe:  # a free port: another job on the machine may hold the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    topology = ["--config_file", str(EXAMPLES / "accelerate/fsdp.yaml")] if sharded else ["--multi_gpu"]
    return [
        *("accelerate", "launch", *topology, "--num_processes", "2", "--num_machines", "1"),
        *("--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "crepa", "train", str(run), "--no-progress"),
        *(arg for override in overrides for arg in ("--set", override)),
        *(["--resume", "latest"] if resume else []),
    ]


def launch_env() -> dict[str, str]:
    bindir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def launch(
    run: Path, *overrides: str, sharded: bool = False, resume: bool = False, timeout: float = 900
) -> subprocess.CompletedProcess:
    """The launch of :func:`launch_command`, in the run file's folder; asserts it succeeded."""
    command = launch_command(run, *overrides, sharded=sharded, resume=resume)
    result = subprocess.run(
        command, cwd=run.parent, capture_output=True, text=True, timeout=timeout, env=launch_env()
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_tensors(a_file: Path, b_file: Path, atol: float) -> None:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (key, (a[key] - b[key]).abs().max())


# ---------------------------------------------------------------- a trained run
PROMPTS = ["a red stripe pattern", "a blue stripe pattern"]
SEED = 5  # validation.seed: prompt K of [validation] starts from the noise of seed 5 + K


def train_run(root: Path, overrides: list[str], four_blocks: bool = False) -> Path:
    """Two training steps of a tiny Wan LoRA run, a checkpoint and a validation after each step."""
    run = write_world(root, "wan", clips=2)
    if four_blocks:  # with window 2, block 2 is gated
        set_wan_layers(root / "pipe", 4)
    settings = [
        *("train.max_steps=2", "train.checkpoint_every=1", "train.batch_size=1", "validation.every=1"),
        f"validation.prompts={json.dumps(PROMPTS)}",
        f"validation.seed={SEED}",
        "optim.lr=0.02",  # large steps: each step's LoRA visibly changes the clip
        "crepa.enabled=false",
        *overrides,
    ]
    config = load_config(run, settings)
    precompute(config, progress=False)
    train(config, progress=False)
    return config.output.dir


# ---------------------------------------------------------------- synthetic clips for the metrics
def textured_image(height: int, width: int, seed: int = 0, blur: float = 2.0) -> np.ndarray:
    """Smooth random colour texture, uint8 (H, W, 3), using the full 0..255 range."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), blur)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).round().astype(np.uint8)


def translating_clip(
    num_frames: int, height: int, width: int, shift: tuple[int, int], seed: int = 0, blur: float = 2.0
) -> np.ndarray:
    """uint8 (T, H, W, 3) whose content moves by shift = (dx, dy) pixels per frame.

    frame[t + 1][y + dy, x + dx] == frame[t][y, x], so the flow from t to t + 1 is (dx, dy).
    """
    dx, dy = shift
    margin_x, margin_y = abs(dx) * num_frames, abs(dy) * num_frames
    big = textured_image(height + 2 * margin_y, width + 2 * margin_x, seed, blur)
    frames = [
        big[margin_y - t * dy : margin_y - t * dy + height, margin_x - t * dx : margin_x - t * dx + width]
        for t in range(num_frames)
    ]
    return np.stack(frames)


def start_cli(*args: str, cwd: Path | None = None, **popen) -> subprocess.Popen:
    """``python -m crepa ARGS`` started in the background (unbuffered), for tests that signal or kill it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "crepa", *args], cwd=cwd, env=env, **popen)


def sigkill_once_written(process: subprocess.Popen, path: Path, timeout: float = 600) -> None:
    """SIGKILL ``process`` as soon as ``path`` exists (a checkpoint folder, say), or when it ends or
    ``timeout`` seconds pass first; waits for it to die."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
