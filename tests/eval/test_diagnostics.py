"""`crepa eval --diagnostics RUN_FILE`: a tiny saved Wan pipeline, a real precomputed cache and a saved LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import pytest
import torch
from typer.testing import CliRunner

from crepa.cli import app
from crepa.config import LoraSection, load_config
from crepa.eval.tiny import save_tiny_extractors
from crepa.io.video import write_video
from crepa.models.registry import get_family
from crepa.models.tiny_pipelines import save_tiny_pipeline
from crepa.precompute import precompute
from crepa.train.lora import add_lora, save_lora
from helpers import translating_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnostics")
    pipeline = save_tiny_pipeline("wan", root / "pipeline")
    teacher = save_tiny_extractors(root / "extractors")["dinov2"]
    data = root / "data"
    for index in range(2):
        write_video(data / f"clip{index}.mp4", translating_clip(12, 64, 96, (2, 1), seed=index), fps=12)
        (data / f"clip{index}.txt").write_text(f"a drifting texture number {index}")
    run_file = root / "run.toml"
    run_file.write_text(
        f"""
[model]
pretrained = "{pipeline}"
[data]
source = "{data}"
resolutions = [[64, 96]]
num_frames = [9]
[cache]
dir = "{root / "cache"}"
[teacher]
name = "{teacher}"
max_pixels = 20000
[crepa]
block_index = 1
"""
    )
    precompute(load_config(run_file), progress=False)

    family = get_family("wan")
    transformer = diffusers.WanTransformer3DModel.from_pretrained(pipeline / "transformer")
    add_lora(transformer, family, LoraSection(rank=4, alpha=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA: lora_B is zero at initialisation
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    save_lora(transformer, family, root / "lora")
    return {"root": root, "run_file": run_file, "lora": root / "lora"}


def diagnose(run: dict[str, Path], out: Path, *extra: str):
    args = ["eval", "--diagnostics", str(run["run_file"]), "--clips", "2", "--draws", "2", "--k", "4"]
    return runner.invoke(app, [*args, "--out", str(out), *extra])


def test_diagnostics_of_base_and_lora_write_per_layer_curves_and_cknna(run):
    out = run["root"] / "diag"
    result = diagnose(run, out, "--lora", str(run["lora"]))
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "layers.json").read_text())
    base, lora = layers["adjacent_frame_similarity"]["base"], layers["adjacent_frame_similarity"]["lora"]
    assert len(base) == len(lora) == 2  # the tiny Wan has 2 blocks
    assert all(-1 <= value <= 1 for value in base + lora)
    assert max(abs(a - b) for a, b in zip(base, lora, strict=True)) > 1e-4  # the LoRA changes the states
    assert set(layers["cknna"]) == {"base", "lora"}
    assert all(math.isfinite(value) and -1 <= value <= 1 for value in layers["cknna"].values())
    assert layers["block_index"] == 1
    assert layers["samples"] == 4 and len(layers["timesteps"]) == 4
    image = (out / "layers.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 5000

    # Seeded: the base model's numbers do not depend on whether a LoRA is compared afterwards.
    alone = run["root"] / "diag_base"
    assert diagnose(run, alone).exit_code == 0
    base_only = json.loads((alone / "layers.json").read_text())
    assert base_only["adjacent_frame_similarity"] == {"base": base}
    assert base_only["cknna"]["base"] == pytest.approx(layers["cknna"]["base"])


def test_diagnostics_errors_name_the_problem(run):
    result = diagnose(run, run["root"] / "bad", "--lora", str(run["root"] / "no_lora_here"))
    assert result.exit_code == 2 and "pytorch_lora_weights.safetensors" in result.output
    result = diagnose(run, run["root"] / "bad", "--block", "7")
    assert result.exit_code == 2 and "outside the model's 2 blocks" in " ".join(result.output.split())
