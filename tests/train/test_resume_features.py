"""Exact resume with the trainer's stateful options on (EMA, caption dropout, two data sources with
repeats, a loss weighting and a timestep sampler): a run killed with SIGKILL after a checkpoint and resumed ends with the losses and
the files, EMA and raw, of a run that was never stopped (the style of test_train's SIGKILL test)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_train import losses

from crepa.config import load_config
from crepa.precompute import precompute
from helpers import sigkill_once_written, start_cli, two_sources

FEATURES = [
    "data.caption_dropout=0.5",
    "ema.enabled=true",
    "ema.decay=0.9",
    "ema.update_every=2",
    'train.loss_weighting="min_snr"',
    'train.timestep_sampling="mode"',
]


def test_exact_resume_with_ema_caption_dropout_and_sources_after_sigkill(tmp_path):
    run = two_sources(tmp_path)  # repeats 3 and 1, a caption prefix, two frame counts
    precompute(load_config(run), progress=False)
    sets = [arg for key in FEATURES for arg in ("--set", key)]
    steps = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--no-progress", *sets]
    straight = start_cli("train", str(run), *steps, "--set", 'output.dir="straight"', cwd=tmp_path)
    assert straight.wait(timeout=600) == 0
    killed = start_cli("train", str(run), *steps, "--set", 'output.dir="killed"', cwd=tmp_path)
    checkpoint = tmp_path / "killed/checkpoints/step-000003"
    sigkill_once_written(killed, checkpoint)
    assert (checkpoint / "ema.safetensors").is_file()
    assert not (tmp_path / "killed/training_summary.json").exists()
    resumed = start_cli(
        "train", str(run), *steps, "--set", 'output.dir="killed"', "--resume", "latest", cwd=tmp_path
    )
    assert resumed.wait(timeout=600) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_raw.safetensors",
        "projector.safetensors",
        "projector_raw.safetensors",
    ):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = (
        load_file(tmp_path / "straight" / n) for n in ("projector.safetensors", "projector_raw.safetensors")
    )
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA is not the raw weights
