"""lora.variant: a DoRA run's exported weights load into the family's diffusers pipeline with
``load_lora_weights``, hold the trained values and change the transformer's output; LoKr and LoHa,
which the video pipelines of diffusers cannot load, are refused by the run file with exit 2."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from crepa.config import load_config
from crepa.experiment.runfiles import parse_variants, write_runs
from crepa.precompute import precompute
from crepa.train.recipe import train
from helpers import run_cli, write_world


@pytest.fixture(scope="module")
def wan_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    run = write_world(root, "wan")
    precompute(load_config(run), progress=False)
    return run


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The tiny Wan transformer on a fixed input (B=1, C, F=3, H=W=4), text (1, 8, text_dim)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, transformer.config.in_channels, 3, 4, 4, generator=generator)
    text = torch.randn(1, 8, transformer.config.text_dim, generator=generator)
    with torch.no_grad():
        return transformer(latents, torch.tensor([500]), text, return_dict=False)[0]


def test_dora_export_loads_in_diffusers_and_changes_the_output(wan_world, capsys):
    variant, marker = "dora", "lora_magnitude_vector"
    # lr 1e-2: two steps move the adapter visibly
    config = load_config(
        wan_world,
        [f'lora.variant="{variant}"', f'output.dir="{variant}"', "train.max_steps=2", "optim.lr=1e-2"],
    )
    train(config, progress=False)
    printed = capsys.readouterr().out  # the start-up summary names every trainer option
    for option in (
        "lora.variant=dora",
        "data.caption_dropout=0.0",
        "train.loss_weighting=none",
        "ema.enabled=False",
    ):
        assert option in printed
    run_config = json.loads((config.output.dir / "run_config.json").read_text())
    assert run_config["lora"]["variant"] == "dora" and run_config["ema"]["validate"] is False
    exported = load_file(config.output.dir / "pytorch_lora_weights.safetensors")
    assert any(marker in key for key in exported)
    pipeline = diffusers.WanPipeline.from_pretrained(wan_world.parent / "pipe")
    before = transformer_output(pipeline.transformer)
    pipeline.load_lora_weights(config.output.dir)
    after = transformer_output(pipeline.transformer)
    assert not torch.allclose(before, after, atol=1e-6)
    loaded = {name: p for name, p in pipeline.transformer.named_parameters() if marker in name}
    assert loaded
    for name, parameter in loaded.items():  # the trained values, not a fresh initialisation
        key = "transformer." + name.replace(".default_0", "").replace(".default", "")
        candidates = [k for k in exported if k.removesuffix(".weight") == key.removesuffix(".weight")]
        assert candidates, name
        torch.testing.assert_close(parameter.detach().reshape(-1), exported[candidates[0]].reshape(-1))


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_variants_diffusers_cannot_load_are_refused_with_exit_2(wan_world, variant):
    result = run_cli(
        "train", str(wan_world), "--set", f'lora.variant="{variant}"', "--no-progress", cwd=wan_world.parent
    )
    stderr = result.stderr
    assert result.returncode == 2 and "lora.variant" in stderr and "load_lora_weights" in stderr


def test_experiment_varies_the_new_keys(wan_world, tmp_path):
    sets = [
        "dora.lora.variant=dora",
        "data.caption_dropout=0.1",
        "ema.enabled=true",
        "ema.validate=true",
        "train.loss_weighting=min_snr",
        "train.timestep_sampling=mode",
    ]
    variants, shared = parse_variants("crepa,dora=crepa", sets)
    runs = write_runs(wan_world, variants, shared, (0,), tmp_path / "runs")
    configs = {run.variant: config for run, config in runs}
    assert configs["dora"].lora.variant == "dora" and configs["crepa"].lora.variant == "lora"
    for config in configs.values():
        assert config.data.caption_dropout == 0.1 and config.ema.validate_with_ema
        assert (config.train.loss_weighting, config.train.timestep_sampling) == ("min_snr", "mode")
