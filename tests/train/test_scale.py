"""Training at scale on CPU: precision of trainables over half-precision weights, multi-process
decisions (similarity cutoff), sharded (FSDP2) training and clean exits under load."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crepa.cache import shards
from crepa.cache.dataset import CachedDataset
from crepa.config import load_config
from crepa.precompute import precompute
from crepa.rundir import CHECKPOINT_STATE
from crepa.train import checkpoint as ckpt
from crepa.train.batches import BucketedBatchOrder, batch_loader
from crepa.train.recipe import train
from helpers import assert_same_tensors, launch, launch_command, launch_env, set_wan_layers, write_world

real_checksum = shards.tensors_checksum


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-world")
    run = write_world(root, "wan")
    precompute(load_config(run), progress=False)
    return run


def test_bf16_weights_train_fp32_lora_that_moves_below_bf16_resolution(wan_run):
    overrides = ['model.dtype="bf16"', "train.max_steps=3", "train.checkpoint_every=1", "optim.lr=1e-5"]
    config = load_config(wan_run, [*overrides, 'output.dir="bf16"'])
    summary = train(config, progress=False)
    assert summary.steps == 3 and summary.skipped_nonfinite == 0
    checkpoints = config.output.dir / "checkpoints"
    after_1 = load_file(checkpoints / "step-000001/trainable.safetensors")
    after_3 = load_file(checkpoints / "step-000003/trainable.safetensors")
    assert {tensor.dtype for tensor in after_3.values()} == {torch.float32}  # LoRA, projector
    assert any(".lora_A." in key for key in after_3) and any(key.startswith("projector.") for key in after_3)
    state = ckpt.load_state(checkpoints / "step-000003", CHECKPOINT_STATE)["optimizer"]
    moments = [t for entry in state["state"].values() for k, t in entry.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert load_file(config.output.dir / "projector.safetensors")["0.weight"].dtype == torch.float32

    # lora_A starts random (|a| ~ 0.1) and takes ~lr-sized Adam steps: below bf16's spacing there.
    moved, lost, large_count = 0, 0, 0
    for key in (k for k in after_3 if ".lora_A." in k):
        before, delta = after_1[key], after_3[key] - after_1[key]
        large = before.abs() > 2**-6  # bf16 spacing >= 2**-13 = 1.2e-4 there, 3x the largest update
        assert delta.abs().max() < 4e-5
        as_bf16 = before.bfloat16()
        moved += int((delta[large] != 0).sum())
        lost += int(((as_bf16.float() + delta).bfloat16() == as_bf16)[large].sum())
        large_count += int(large.sum())
    assert large_count > 100
    assert moved >= 0.9 * large_count  # the fp32 LoRA moved ...
    assert lost == large_count  # ... where every one of these updates would vanish in a bf16 LoRA


def test_loader_batches_are_a_function_of_position_for_any_worker_count(wan_run, monkeypatch):
    dataset = CachedDataset(load_config(wan_run).cache.dir)
    order = BucketedBatchOrder(dataset.buckets, 2, seed=3)
    expected = []  # reference: the order's index lists, samples read one by one and stacked
    for indices in itertools.islice(order.iterate(1), 5):
        items = [dataset[i] for i in indices]
        expected.append({key: torch.stack([item[key] for item in items]) for key in ("latents", "teacher")})
    for workers in (0, 2):
        loaded = list(itertools.islice(batch_loader(dataset, order, 1, workers, pin_memory=False), 5))
        for got, want in zip(loaded, expected, strict=True):
            assert all(torch.equal(got[key], want[key]) for key in want), workers

    checks = []
    monkeypatch.setattr(shards, "tensors_checksum", lambda part: checks.append(1) or real_checksum(part))
    fresh = CachedDataset(load_config(wan_run).cache.dir)
    for _ in range(3):  # three epochs over the cache in one process
        for index in range(len(fresh)):
            fresh[index]
    assert len(checks) == 3 * len(fresh)  # latents, text, teacher: each part verified once


def launch_process(run: Path, *overrides: str, sharded: bool = False) -> subprocess.Popen:
    """The same launch, running, with its stderr readable line by line (own process group)."""
    command = launch_command(run, *overrides, sharded=sharded)
    return subprocess.Popen(
        command,
        cwd=run.parent,
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def summary_of(output: Path) -> dict:
    return json.loads((output / "training_summary.json").read_text())


@pytest.mark.slow
def test_fsdp2_lora_equals_data_parallel_and_resumes(wan_run):
    common = ["train.max_steps=4", "train.batch_size=1", "train.checkpoint_every=2", "validation.every=4"]
    launch(wan_run, *common, 'output.dir="ddp"')
    launch(wan_run, *common, 'output.dir="fsdp"', sharded=True)
    root = wan_run.parent
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors"):
        assert_same_tensors(root / "ddp" / name, root / "fsdp" / name, atol=1e-6)
    fsdp = summary_of(root / "fsdp")
    assert fsdp["parallelism"] == "fsdp" and summary_of(root / "ddp")["parallelism"] == "ddp"
    assert fsdp["steps"] == 4 and len(set(fsdp["rank_weight_checksums"])) == 1
    assert (root / "fsdp/validation/step-000004/prompt-0.mp4").is_file()  # every rank sampled, no deadlock
    ddp_losses = [
        json.loads(line)["loss/total"] for line in (root / "ddp/metrics.jsonl").read_text().splitlines()
    ]
    fsdp_losses = [
        json.loads(line)["loss/total"] for line in (root / "fsdp/metrics.jsonl").read_text().splitlines()
    ]
    assert np.allclose(fsdp_losses, ddp_losses, rtol=1e-5, atol=1e-6)

    # the step-2 checkpoint holds whole tensors: resumed under FSDP it ends where the straight run did
    shutil.copytree(root / "fsdp/checkpoints/step-000002", root / "resumed/checkpoints/step-000002")
    resumed = launch(wan_run, *common, 'output.dir="resumed"', sharded=True, resume=True)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_tensors(
        root / "fsdp/pytorch_lora_weights.safetensors",
        root / "resumed/pytorch_lora_weights.safetensors",
        atol=1e-6,
    )


# ~30 s on 2 cores (a two-process launch; test_train.py keeps one in the default run): the slow suite
@pytest.mark.slow
def test_similarity_cutoff_is_decided_once_for_all_ranks(wan_run):
    common = ["train.batch_size=1", "train.checkpoint_every=100", "crepa.ema_decay=0.5"]
    # the EMA is checked every 10 updates: this run measures each rank's own EMA at the first check
    launch(wan_run, *common, "train.max_steps=10", "crepa.ema_threshold=1e9", 'output.dir="measure"')
    own = summary_of(wan_run.parent / "measure")["rank_score_ema"]
    low, high = sorted(own)
    assert high - low > 1e-4  # the ranks see different clips
    threshold = low + 0.25 * (high - low)  # one rank's own EMA is above, the other's below; the mean is above
    launch(wan_run, *common, "train.max_steps=12", f"crepa.ema_threshold={threshold}", 'output.dir="cut"')
    summary = summary_of(wan_run.parent / "cut")
    assert summary["rank_score_ema"] == own  # same trajectory up to the check
    assert summary["rank_cutoff_steps"] == [10, 10]  # both ranks stop aligning from step 10, no hang
    assert summary["final_metrics"]["crepa/weight"] == 0.0


def metric(output: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_with_checkpointing_capture_and_repvideo(wan_run):
    common = ["train.max_steps=2", "model.gradient_checkpointing=true", "repvideo.enabled=true"]
    eager = load_config(wan_run, [*common, 'output.dir="eager"'])
    compiled = load_config(wan_run, [*common, "model.compile=true", 'output.dir="compiled"'])
    train(eager, progress=False)
    train(compiled, progress=False)
    for key in ("loss/total", "crepa/loss", "crepa/score"):  # capture worked on every step
        assert np.allclose(
            metric(compiled.output.dir, key), metric(eager.output.dir, key), rtol=1e-4, atol=1e-5
        )
    assert_same_tensors(
        eager.output.dir / "pytorch_lora_weights.safetensors",
        compiled.output.dir / "pytorch_lora_weights.safetensors",
        atol=1e-5,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_every_rank_exits_promptly_on_a_loaded_machine(wan_run, sharded):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for attempt in range(5):
            process = launch_process(
                wan_run,
                "train.max_steps=2",
                "train.batch_size=1",
                f'output.dir="exit-{"fsdp" if sharded else "ddp"}{attempt}"',  # fresh folders: no resume
                sharded=sharded,
            )
            # the main rank prints "done: ..." once train() returns; train() ends with an exchange of
            # every rank's summary, so by then each rank has finished training
            finished = any(line.startswith("done:") for line in process.stderr)
            assert finished, f"attempt {attempt}: the run did not finish training"
            try:
                process.wait(timeout=60)  # a hung rank would never exit
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"attempt {attempt}: a rank was still running 60 s after training finished")
            assert process.returncode == 0
    finally:
        for loop in busy:
            loop.kill()


@pytest.mark.slow
def test_fsdp2_with_repvideo_equals_data_parallel(tmp_path, tiny_world):
    wan_run = tiny_world("wan")
    set_wan_layers(tmp_path / "pipe", 3)  # RepVideo with window 2 gates block 2 of 3 (0, 1 follow a restart)
    precompute(load_config(wan_run), progress=False)
    common = ["train.max_steps=2", "train.batch_size=1", "repvideo.enabled=true", "repvideo.window=2"]
    common += ["repvideo.gate_init=0.5", "repvideo.lr=0.01", "crepa.block_index=1"]
    launch(wan_run, *common, 'output.dir="rep-ddp"')
    launch(wan_run, *common, 'output.dir="rep-fsdp"', sharded=True)
    root = wan_run.parent
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors", "repvideo_gates.safetensors"):
        assert_same_tensors(root / "rep-ddp" / name, root / "rep-fsdp" / name, atol=1e-6)
    gates = load_file(root / "rep-fsdp/repvideo_gates.safetensors")["gate"]
    assert gates[2] != 0.5  # the gated block's gate trained
    fsdp = summary_of(root / "rep-fsdp")
    assert fsdp["parallelism"] == "fsdp" and len(set(fsdp["rank_weight_checksums"])) == 1
