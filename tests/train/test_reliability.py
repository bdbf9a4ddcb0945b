"""Fault classes of `crepa precompute` / `train` / `eval` (see docs/reliability.md):

- every run-file mistake stops before a weight or sample is read: exit 2, one message naming the
  key, no traceback (including a cache that no longer matches the run file, resumes that do not
  fit, and a checkpoint carrying a pickle payload);
- a full or read-only disk: exit 1, one line naming the path and what was kept, no temporary files;
- SIGTERM: a checkpoint, then exit 143;
- an update that leaves non-finite weights is undone and never saved; too many in a row: exit 1."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model
from typer.testing import CliRunner

import crepa.train.setup as train_setup
from crepa.cli import app
from crepa.config import load_config
from crepa.precompute import precompute
from crepa.teachers.transformers_vit import load_transformers_teacher
from crepa.train import checkpoint as ckpt
from crepa.train.recipe import train
from helpers import start_cli, write_world


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A precomputed tiny Wan world (4 clips of 9x32x32, rank-4 LoRA) with a 2-step run in ``trained``."""
    root = tmp_path_factory.mktemp("preflight")
    run = write_world(root, "wan")
    torch.manual_seed(1)
    config = Dinov2Config(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56
    )
    Dinov2Model(config).save_pretrained(root / "dino2")
    (root / "a-file").write_text("not a folder")
    precompute(load_config(run), progress=False)
    train(load_config(run, ["train.max_steps=2", 'output.dir="trained"']), progress=False)
    return run


# (id, arguments after the run file, fragment the message must contain)
BROKEN = [
    ("lr-inf", ["--set", "optim.lr=inf"], "optim.lr: expected a finite number"),
    ("lr-nan", ["--set", "optim.lr=nan"], "optim.lr: expected a finite number"),
    ("lr-negative", ["--set", "optim.lr=-1.0"], "optim.lr: expected greater than 0"),
    ("weight-inf", ["--set", "crepa.weight=inf"], "crepa.weight: expected a finite number"),
    ("typo", ["--set", "crepa.tua=1.0"], "crepa.tua: unknown key. did you mean 'crepa.tau'"),
    ("tau-word", ["--set", 'crepa.tau="one"'], "crepa.tau: expected a valid number"),
    ("max-steps-0", ["--set", "train.max_steps=0"], "train.max_steps"),
    ("accumulation-0", ["--set", "train.gradient_accumulation=0"], "train.gradient_accumulation"),
    (
        "batch-over-dataset",
        ["--set", "train.batch_size=5"],
        "train.batch_size: 5 x 1 process(es) is more than",
    ),
    ("rank-0", ["--set", "lora.rank=0"], "lora.rank"),
    ("dropout-1", ["--set", "lora.dropout=1.0"], "lora.dropout"),
    (
        "lora-targets",
        ["--set", 'lora.targets=["no_such_module"]'],
        "no_such_module'} matches no module of WanTransformer3DModel",
    ),
    ("frames-invalid", ["--set", "data.num_frames=[8]"], "data.num_frames: 8 frames cannot be encoded"),
    (
        "resolution-invalid",
        ["--set", "data.resolutions=[[30, 32]]"],
        "data.resolutions: 30x32 must be divisible",
    ),
    ("block-beyond", ["--set", "crepa.block_index=9"], "crepa.block_index: 9 is beyond the model's"),
    (
        "validation-frames",
        ["--set", "validation.every=2", "--set", "validation.num_frames=8"],
        "validation.num_frames: the model generates 1 + 4*m frames, not 8; use 9",
    ),
    (
        "validation-height",
        ["--set", "validation.every=2", "--set", "validation.height=30"],
        "validation.height: 30 is not a multiple of 16",
    ),
    ("betas", ["--set", "optim.betas=[0.9]"], "optim.betas"),
    ("max-pixels", ["--set", "teacher.max_pixels=10"], "teacher.max_pixels"),
    ("repvideo-window", ["--set", "repvideo.window=0"], "repvideo.window"),
    ("projector-kind", ["--set", 'crepa.projector="conv"'], "crepa.projector"),
    ("start-negative", ["--set", "data.start=-1"], "data.start"),
    ("precision", ["--set", 'train.mixed_precision="fp8"'], "train.mixed_precision"),
    (
        "backbone-online",
        [
            "--set",
            'crepa.mode="backbone"',
            "--set",
            "crepa.teacher_block_index=1",
            "--set",
            'cache.teacher_source="pixels"',
        ],
        "cache.teacher_source: backbone mode needs no external teacher",
    ),
    ("override-syntax", ["--set", "train.max_steps"], "expected KEY=VALUE"),
    ("pretrained-missing", ["--set", 'model.pretrained="./no-such-model"'], "model.pretrained"),
    ("family-unknown", ["--set", 'model.family="nope"'], "model.family"),
    ("cache-missing", ["--set", 'cache.dir="no-such-cache"'], "cache.dir"),
    ("output-is-file", ["--set", 'output.dir="a-file"'], "output.dir:"),
    ("resume-missing", ["--resume", "no-such-checkpoint"], "--resume no-such-checkpoint: no such directory"),
    ("resume-latest-none", ["--resume", "latest"], "--resume latest:"),
    (
        "resume-rank",
        ["--set", 'output.dir="trained"', "--set", "lora.rank=2", "--resume", "latest"],
        "lora.rank: checkpoint has LoRA rank 4, run file asks for 2",
    ),
    (
        "resume-name",  # a bare checkpoint name of output.dir: found, then its settings are compared
        ["--set", 'output.dir="trained"', "--set", "lora.rank=2", "--resume", "step-000002"],
        "lora.rank: checkpoint has LoRA rank 4, run file asks for 2",
    ),
    (
        "resume-projector",
        ["--set", 'output.dir="trained"', "--set", "crepa.projector_hidden_dim=32", "--resume", "latest"],
        "crepa.projector_hidden_dim: checkpoint has projector hidden width 64, run file asks for 32",
    ),
    ("cache-teacher", ["--set", 'teacher.name="dino2"'], "teacher.name: cache built with"),
    (
        "cache-resolution",
        ["--set", "data.resolutions=[[48, 48]]"],
        "data.resolutions: cache built with [[32, 32]]",
    ),
    ("cache-frames", ["--set", "data.num_frames=[5]"], "data.num_frames: cache built with [9]"),
    ("cache-fps", ["--set", "data.fps=4.0"], "data.fps: cache built with None"),
    (
        "teacher-kind-online",
        ["--set", 'teacher.kind="clip"', "--set", 'cache.teacher_source="pixels"'],
        "teacher.kind: 'clip', but",
    ),
    (
        "teacher-missing",
        ["--set", 'teacher.name="./no-such-teacher"', "--set", 'cache.teacher_source="pixels"'],
        "teacher.name",
    ),
    pytest.param(
        "wandb",
        ["--set", "logging.wandb=true"],
        "logging.wandb: needs the 'wandb' package",
        marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
    ),
    pytest.param(
        "timm",
        ["--set", 'teacher.kind="timm"'],
        "teacher.kind: needs the 'timm' package",
        marks=pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed"),
    ),
]


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize(("name", "arguments", "fragment"), BROKEN, ids=[_ids(case) for case in BROKEN])
def test_broken_run_file_exits_2_before_any_weight(world, monkeypatch, name, arguments, fragment):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the run file was checked")

    monkeypatch.setattr(train_setup, "load_transformer", no_weights)
    monkeypatch.setattr(train_setup, "Accelerator", no_weights)
    monkeypatch.chdir(world.parent)
    if not any(arg.startswith(("output.dir", "--resume")) for arg in arguments) or name == "resume-missing":
        arguments = [*arguments, "--set", f'output.dir="out-{name}"']
    result = CliRunner().invoke(app, ["train", str(world), *arguments, "--no-progress"])
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 2, output
    assert fragment in " ".join(output.split()), output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_subprocess_exit_2_without_traceback_and_no_pickle_run(world, tmp_path, run_cli):
    """Three real processes: a cache mismatch, a checkpoint carrying a pickle, a bad precompute setting."""
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "training_state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    shutil.copy(world.parent / "trained/checkpoints/step-000002/trainable.safetensors", hostile)
    cases = [
        (["train", str(world), "--set", "data.num_frames=[5]"], "data.num_frames: cache built with"),
        (
            ["train", str(world), "--resume", str(hostile), "--set", 'output.dir="trained"'],
            "not a crepa checkpoint",
        ),
        (["precompute", str(world), "--set", 'teacher.kind="clip"'], "teacher.kind: 'clip', but"),
    ]
    for arguments, fragment in cases:
        result = run_cli(*arguments, cwd=world.parent)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert fragment in " ".join(output.split()) and "Traceback" not in output
    assert not marker.exists()


def _run_train(world: Path, monkeypatch, *arguments: str) -> str:
    monkeypatch.chdir(world.parent)
    result = CliRunner().invoke(app, ["train", str(world), "--no-progress", *arguments])
    output = " ".join((result.stdout + (result.stderr or "")).split())
    assert result.exit_code == 2, output
    return output


def test_cache_with_other_vae_weights_is_refused(world, tmp_path, monkeypatch):
    """Same family, same folder, the VAE's weights replaced: only the VAE is named."""
    copy = tmp_path / "world"
    shutil.copytree(world.parent, copy, symlinks=True)
    run = copy / world.name
    precompute(load_config(run), progress=False)
    vae = diffusers.AutoencoderKLWan.from_pretrained(copy / "pipe/vae")
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(copy / "pipe/vae")
    output = _run_train(run, monkeypatch, "--set", 'output.dir="out-vae"')
    assert "model.pretrained / cache.vae_tiling (VAE / image-encoder weights): cache built with" in output
    assert "text encoders" not in output and "crepa precompute" in output


def test_manifest_with_swapped_teacher_keys_is_refused(world, tmp_path, monkeypatch):
    copy = tmp_path / "world"
    shutil.copytree(world.parent, copy, symlinks=True)
    run = copy / world.name
    precompute(load_config(run), progress=False)  # the copy's own manifest (absolute paths)
    manifest_path = copy / "cache/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    first, second = manifest["entries"][0]["parts"], manifest["entries"][1]["parts"]
    first["teacher"], second["teacher"] = second["teacher"], first["teacher"]
    manifest_path.write_text(json.dumps(manifest))
    output = _run_train(run, monkeypatch, "--set", 'output.dir="out-swap"')
    assert "manifest.json does not match its clips" in output and "teacher part(s) do not belong" in output


def test_teacher_of_another_kind_is_an_error(world):
    with pytest.raises(ValueError, match="not a clip checkpoint"):
        load_transformers_teacher(world.parent / "dino", "clip")


# ---------------------------------------------------------------- disk errors
def _temporary_files(folder: Path) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.name.startswith((".tmp", ".trash"))]


@pytest.mark.parametrize("native", [False, True], ids=["oserror", "safetensors-message"])
def test_full_disk_during_training_is_one_line_and_keeps_checkpoints(world, monkeypatch, native):
    calls = []
    real_save = ckpt.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if filename.endswith("trainable.safetensors"):
            calls.append(filename)
            if len(calls) == 2:  # the second checkpoint hits a full disk
                if native:  # what safetensors' Rust writer raises
                    raise RuntimeError(
                        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                        'message: "No space left on device" })'
                    )
                raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    monkeypatch.chdir(world.parent)
    out = f"out-enospc-{native}"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(world),
            "--no-progress",
            "--set",
            f'output.dir="{out}"',
            "--set",
            "train.checkpoint_every=1",
            "--set",
            "train.max_steps=3",
        ],
    )
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 1, output
    lines = [line for line in output.splitlines() if line.startswith("cannot write:")]
    assert len(lines) == 1, (output, result.exception)
    line = lines[0]
    expected = (
        f"{world.parent / out}/checkpoints/.tmp-step-000002" if not native else f"{world.parent / out}:"
    )
    assert expected in line and "no space left on the device" in line
    assert "checkpoints up to" in line and "step-000001 are intact" in line and "Traceback" not in output
    assert [p.name for p in ckpt.checkpoint_dirs(world.parent / out / "checkpoints")] == ["step-000001"]
    assert _temporary_files(world.parent / out) == []


def test_read_only_cache_during_precompute_is_one_line_without_temporary_files(world, monkeypatch):
    import crepa.cache.atomic as atomic

    def read_only(source, destination):
        raise OSError(errno.EROFS, "Read-only file system", str(destination))

    monkeypatch.setattr(atomic.os, "replace", read_only)
    monkeypatch.chdir(world.parent)
    result = CliRunner().invoke(
        app, ["precompute", str(world), "--no-progress", "--set", 'cache.dir="cache-ro"']
    )
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 1, output
    line = next(line for line in output.splitlines() if line.startswith("cannot write:"))
    assert (
        "cache-ro/shards/" in line and "read-only file system" in line and "finished shards are kept" in line
    )
    assert "Traceback" not in output and _temporary_files(world.parent / "cache-ro") == []
    assert not (world.parent / "cache-ro/.crepa.lock").exists()  # the lock is released on the way out


def test_permission_denied_in_eval_is_one_line(world, monkeypatch, tmp_path):
    import crepa.cache.atomic as atomic

    def denied(source, destination):
        raise OSError(errno.EACCES, "Permission denied", str(destination))

    monkeypatch.setattr(atomic.os, "replace", denied)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(world.parent / "clips"),
            "--out",
            str(tmp_path / "eval"),
            "--metrics",
            "temporal_flickering",
            "--no-progress",
        ],
    )
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 1, output
    assert f"cannot write: {tmp_path / 'eval'}" in output and "permission denied" in output
    assert "Traceback" not in output and _temporary_files(tmp_path) == []


# ---------------------------------------------------------------- signals and non-finite updates
@pytest.mark.parametrize(
    ("name", "code"), [("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)]
)
def test_signal_saves_a_checkpoint_and_exits_143_or_130(world, name, code):
    out = world.parent / f"out-{name}"
    process = start_cli(
        *("train", str(world), "--no-progress", "--set", f'output.dir="out-{name}"'),
        *("--set", "train.max_steps=200", "--set", "train.checkpoint_every=1000"),
        cwd=world.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == code, stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["stop_signal"] == name and summary["interrupted"] and 1 <= summary["steps"] < 200
    assert [p.name for p in ckpt.checkpoint_dirs(out / "checkpoints")] == [f"step-{summary['steps']:06d}"]
    assert f"stopped by {name}" in stderr and "Traceback" not in stderr


def test_nonfinite_updates_are_undone_never_saved_and_stop_the_run(world, monkeypatch):
    monkeypatch.chdir(world.parent)
    out = world.parent / "out-nonfinite"
    arguments = [
        "--set",
        'output.dir="out-nonfinite"',
        "--set",
        "optim.lr=1e37",
        "--set",
        "train.checkpoint_every=1",
    ]
    arguments += [
        "--set",
        "train.max_nonfinite_steps=2",
        "--set",
        "train.max_steps=6",
        "--set",
        "logging.every=1",
    ]
    result = CliRunner().invoke(app, ["train", str(world), "--no-progress", *arguments])
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 1, output
    assert "update undone (1 in a row)" in output and "2 optimiser steps in a row" in output
    assert "Traceback" not in output
    checkpoints = ckpt.checkpoint_dirs(out / "checkpoints")
    assert checkpoints
    for checkpoint in checkpoints:
        tensors = load_file(checkpoint / "trainable.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), checkpoint
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["train/skipped_nonfinite"] >= 1 and np.isfinite(logged[0]["loss/total"])
