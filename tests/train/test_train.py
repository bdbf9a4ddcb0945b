"""`crepa train` end to end on tiny saved pipelines: precompute -> train -> checkpoint -> resume ->
the LoRA loads into the family's pipeline; exact resume after SIGKILL; two processes under accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crepa.config import load_config
from crepa.precompute import precompute
from crepa.train.recipe import train
from helpers import TRAIN_FAMILIES, launch, set_wan_layers, sigkill_once_written, start_cli, write_world


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_precompute_train_resume_and_load_lora(tmp_path, family, tiny_world):
    run = tiny_world(family)
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
    assert summary_file["device"] == "cpu"  # the default suite hides CUDA (tests/conftest.py)


def type_of_pipeline(directory: Path) -> str:
    return json.loads((directory / "model_index.json").read_text())["_class_name"]


def test_exact_resume_after_sigkill(tmp_path, tiny_world):
    run = tiny_world("wan")
    precompute(load_config(run), progress=False)
    steps = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--no-progress"]
    straight = start_cli("train", str(run), *steps, "--set", 'output.dir="straight"', cwd=tmp_path)
    assert straight.wait(timeout=600) == 0
    killed = start_cli("train", str(run), *steps, "--set", 'output.dir="killed"', cwd=tmp_path)
    checkpoint = tmp_path / "killed/checkpoints/step-000003"
    sigkill_once_written(killed, checkpoint)
    assert checkpoint.is_dir() and not (tmp_path / "killed/training_summary.json").exists()
    resumed = start_cli(
        "train", str(run), *steps, "--set", 'output.dir="killed"', "--resume", "latest", cwd=tmp_path
    )
    assert resumed.wait(timeout=600) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_stay_in_sync(tmp_path, tiny_world):
    run = tiny_world("wan")
    precompute(load_config(run), progress=False)
    result = launch(run, "train.max_steps=2", "train.batch_size=1")
    assert result.stdout.count("trainer options: ") == 1  # announced once, by the main process
    assert result.stderr.count("done: 2 steps in ") == 1  # and the closing line
    summary = json.loads((tmp_path / "out/training_summary.json").read_text())
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [p.name for p in (tmp_path / "out/checkpoints").iterdir()] == ["step-000002"]


def test_repvideo_with_crepa_trains_and_resumes_exactly(tmp_path, tiny_world):
    run = tiny_world("wan")
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
