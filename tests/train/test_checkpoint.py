"""Checkpoints hold no pickle: state round-trips exactly through JSON + safetensors, a crafted pickle
is never loaded, resume refuses a checkpoint whose shapes or settings do not fit the run file, and a
kill while pruning leaves no half-deleted checkpoint under a valid name."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from crepa.config import ConfigError
from crepa.train import checkpoint as ckpt
from helpers import REPO

SOURCE = REPO / "src" / "crepa"


class _Payload:
    """Unpickling this runs ``os.system``: what a hostile training_state.pt would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trained_optimizer() -> tuple[torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def _equal(a, b) -> bool:
    """Structural equality with exact tensor / array comparison and types kept (tuple is not list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))


def test_state_round_trips_exactly_without_pickle(tmp_path):
    optimizer, scheduler = _trained_optimizer()
    random.random(), np.random.rand(), torch.rand(1)
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "odd": {"__tensor__": 1, 3: (1.5, float("inf"), None)},
    }
    ckpt.save_state(tmp_path, "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = ckpt.load_state(tmp_path, "state")
    assert _equal(loaded, state)
    # the loaded RNG state reproduces the same draws
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(
        torch.rand(3), expected[2]
    )
    # and the loaded optimiser state drives an identical next step
    fresh, fresh_scheduler = _trained_optimizer()
    fresh.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["lr_scheduler"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_crafted_pickle_in_checkpoint_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "checkpoints"
    checkpoint = root / "step-000002"
    checkpoint.mkdir(parents=True)
    for name in ("training_state.pt", "rng-rank0.pt", "optimizer.pt"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match="older crepa that pickled"):
        ckpt.resolve_resume(root, str(checkpoint))
    # a valid-looking new-format checkpoint next to the pickles: only JSON + safetensors are read
    ckpt.write_checkpoint_files(checkpoint, {"transformer.w": torch.ones(2)}, {"step": 2}, rank=0)
    assert ckpt.resolve_resume(root, "latest") == checkpoint
    tensors, state, rng = ckpt.read_checkpoint(checkpoint, rank=0)
    assert state == {"step": 2} and torch.equal(tensors["transformer.w"], torch.ones(2)) and rng is not None
    assert not marker.exists()


def test_no_module_of_crepa_unpickles():
    """torch.load / pickle / numpy allow_pickle are not used anywhere in the package."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|import pickle|allow_pickle=True|weights_only=False")
    offenders = [
        f"{path.relative_to(SOURCE)}:{number}"
        for path in SOURCE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_resume_latest_without_checkpoint_and_missing_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint yet"):
        ckpt.resolve_resume(tmp_path / "checkpoints", "latest")
    assert ckpt.resolve_resume(tmp_path / "checkpoints", "auto") is None
    with pytest.raises(ConfigError, match="no such directory"):
        ckpt.resolve_resume(tmp_path / "checkpoints", str(tmp_path / "nowhere"))


def test_resume_takes_a_checkpoint_name_of_the_run(tmp_path, monkeypatch):
    """--resume step-000009 (or 9) is the run's checkpoints/step-000009, as --checkpoint of sample /
    export reads it; a name that is not there lists the ones that are; full paths still work."""
    root = tmp_path / "run" / "checkpoints"
    ckpt.write_checkpoint_files(root / "step-000009", {"transformer.w": torch.ones(2)}, {"step": 9}, rank=0)
    monkeypatch.chdir(tmp_path)  # the working directory holds no step-000009
    assert ckpt.resolve_resume(root, "step-000009") == root / "step-000009"
    assert ckpt.resolve_resume(root, "9") == root / "step-000009"
    assert ckpt.resolve_resume(root, str(root / "step-000009")) == root / "step-000009"
    with pytest.raises(ConfigError, match=r"step-000003: no such directory.*checkpoints there: step-000009"):
        ckpt.resolve_resume(root, "step-000003")


def test_shape_mismatch_on_resume_names_the_tensor_and_changes_nothing():
    module = torch.nn.Linear(3, 4)
    before = module.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"transformer.weight: checkpoint \(2, 3\), run \(4, 3\)"):
        ckpt.load_trainable_state(
            {"transformer": module},
            {"transformer.weight": torch.zeros(2, 3), "transformer.bias": torch.zeros(4)},
        )
    assert torch.equal(module.weight, before)


def test_resume_settings_compared_before_any_tensor(tmp_path):
    from crepa.config import RunConfig

    config = RunConfig.model_validate(
        {"model": {"pretrained": "x"}, "data": {"source": "y"}, "lora": {"rank": 4}}
    )
    saved = json.loads(config.model_dump_json())
    saved["lora"]["rank"] = 2
    saved["crepa"]["projector_hidden_dim"] = 16
    (tmp_path / "training_state.json").write_text(json.dumps({"config": saved}))
    with pytest.raises(ConfigError) as error:
        ckpt.check_resume_settings(tmp_path, config)
    message = str(error.value)
    assert "checkpoint has LoRA rank 2, run file asks for 4" in message
    assert (
        "crepa.projector_hidden_dim: checkpoint has projector hidden width 16, run file asks for 2048"
        in message
    )


def test_prune_leaves_no_half_deleted_checkpoint_under_a_valid_name(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        staged = ckpt.staging_dir(root, step)
        ckpt.write_checkpoint_files(staged, {"transformer.w": torch.ones(2)}, {"step": step}, rank=0)
        ckpt.publish_checkpoint(root, step, keep=5)

    def killed_midway(path, *args, **kwargs):
        if not Path(path).exists():
            return
        next(Path(path).iterdir()).unlink()  # part of the files are gone when the kill arrives
        raise KeyboardInterrupt

    staged = ckpt.staging_dir(root, 3)
    ckpt.write_checkpoint_files(staged, {"transformer.w": torch.ones(2)}, {"step": 3}, rank=0)
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish_checkpoint(root, 3, keep=1)
    monkeypatch.undo()
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000002", "step-000003"]
    for checkpoint in ckpt.checkpoint_dirs(root):
        ckpt.read_checkpoint(checkpoint, rank=0)  # every checkpoint under a valid name is whole
    # the next publish clears the trash left by the killed prune
    staged = ckpt.staging_dir(root, 4)
    ckpt.write_checkpoint_files(staged, {"transformer.w": torch.ones(2)}, {"step": 4}, rank=0)
    ckpt.publish_checkpoint(root, 4, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]


def test_fresh_start_into_a_folder_with_checkpoints_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint_files(root / "step-000004", {"transformer.w": torch.ones(2)}, {"step": 4}, rank=0)
    with pytest.raises(ConfigError, match=r"earlier run \(up to step-000004\).*--resume latest"):
        ckpt.resolve_resume(root, None)
    assert ckpt.resolve_resume(root, "auto") == root / "step-000004"


def test_crepa_train_twice_keeps_the_first_runs_checkpoints(tmp_path, tiny_world, run_cli):
    """The second `crepa train` without --resume stops before writing anything (exit 2, says how to
    resume); the first run's checkpoint is byte for byte what it was."""
    run = tiny_world("wan")

    def crepa(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=tmp_path)

    steps = ["--set", "train.max_steps=1", "--set", "train.checkpoint_every=1", "--no-progress"]
    assert crepa("precompute", str(run)).returncode == 0
    first = crepa("train", str(run), *steps)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = sorted((tmp_path / "out" / "checkpoints").rglob("*"))
    assert checkpoints
    before = {path: path.read_bytes() for path in checkpoints if path.is_file()}
    second = crepa("train", str(run), *steps)
    message = " ".join(second.stderr.split())
    assert second.returncode == 2, second.stderr[-2000:]
    assert "holds checkpoints of an earlier run" in message and "--resume latest" in message
    assert "Traceback" not in second.stderr
    assert {path: path.read_bytes() for path in before} == before
    # resumed by name: the closing line counts this run's steps and time; then nothing is left to do
    further = ["--set", "train.max_steps=3", "--set", "train.checkpoint_every=1", "--no-progress"]
    started = time.perf_counter()
    third = crepa("train", str(run), *further, "--resume", "step-000001")
    wall = time.perf_counter() - started
    assert third.returncode == 0, third.stderr[-2000:]
    done = re.search(r"done: steps 2-3 \(2 this run\) in ([\d.]+)s on cpu", third.stderr)
    assert done and 0 < float(done.group(1)) < wall, third.stderr[-2000:]
    trained = (tmp_path / "out" / "training_summary.json").read_bytes()
    fourth = crepa("train", str(run), *further, "--resume", "latest")
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    assert (tmp_path / "out" / "training_summary.json").read_bytes() == trained  # the training run's
    message = " ".join(fourth.stderr.split())
    assert "nothing to train: the run was already at step 3 (train.max_steps = 3)" in message
    assert "done:" not in message
