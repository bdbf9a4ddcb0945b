"""Run-file validation: every broken config gives a one-paragraph error naming the key, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from crepa.cli import app
from crepa.config import ConfigError, load_config, parse_override
from crepa.models.tiny_pipelines import save_tiny_pipeline

VALID = """
[model]
pretrained = "{pipeline}"
[data]
source = "clips"
resolutions = [[32, 32]]
num_frames = [5]
[cache]
dir = "cache"
[crepa]
block_index = 0
[train]
max_steps = 2
"""

# (edit applied to the valid text, a fragment the message must contain)
BROKEN = [
    (
        "[crepa]\nblock_index = 0",
        "[crepa]\nblock_index = 0\ntua = 1.0",
        "crepa.tua: unknown key. did you mean 'crepa.tau'",
    ),
    ("max_steps = 2", "max_step = 2", "did you mean 'train.max_steps'"),
    ("[cache]", "[cahce]", "cahce: unknown key. did you mean 'cache'"),
    ("block_index = 0", 'block_index = 0\ntau = "one"', "crepa.tau: expected a valid number"),
    ("block_index = 0", "block_index = 0\ntau = -1", "crepa.tau: expected greater than 0"),
    ("block_index = 0", 'block_index = 0\nweight = "big"', "crepa.weight"),
    ("block_index = 0", 'block_index = 0\nmode = "dino"', "crepa.mode"),
    ("block_index = 0", 'block_index = 0\nmode = "repa"\ndistance = 2', "distance: mode 'repa'"),
    (
        "block_index = 0",
        "block_index = 0\nteacher_block_index = 3",
        "teacher_block_index: only used with mode 'backbone'",
    ),
    ("max_steps = 2", "max_steps = 0", "train.max_steps: expected greater than or equal to 1"),
    ("max_steps = 2", 'max_steps = 2\nmixed_precision = "fp8"', "train.mixed_precision"),
    ("[data]\n", '[data]\nfps = "fast"\n', "data.fps"),
    ("resolutions = [[32, 32]]", "resolutions = [[32]]", "data.resolutions"),
    ('pretrained = "{pipeline}"', "", "model.pretrained: required key is missing"),
    ("block_index = 0", "block_index = 7", "crepa.block_index: 7 is beyond the model's 2 blocks"),
    ("num_frames = [5]", "num_frames = [6]", "data.num_frames: 6 frames cannot be encoded"),
    (
        "resolutions = [[32, 32]]",
        "resolutions = [[36, 32]]",
        "data.resolutions: 36x32 must be divisible by 16",
    ),
    ('dir = "cache"', 'dir = "no-such-cache"', "cache.dir"),
    ("[train]", "[train]\nseed = [1, 2]", "train.seed"),
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("wan-pipeline"))


@pytest.mark.parametrize(("old", "new", "fragment"), BROKEN, ids=[case[2][:40] for case in BROKEN])
def test_broken_config_exits_2_naming_the_key(tmp_path, pipeline_dir, old, new, fragment):
    valid = VALID.format(pipeline=pipeline_dir)
    old, new = old.format(pipeline=pipeline_dir), new.format(pipeline=pipeline_dir)
    assert old in valid
    path = tmp_path / "run.toml"
    path.write_text(valid.replace(old, new, 1))
    result = CliRunner().invoke(app, ["train", str(path)])
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 2, output
    assert fragment in " ".join(output.split()), output
    assert "Traceback" not in output


def test_subprocess_error_has_no_traceback(tmp_path, run_cli):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npretrained = "x"\n[data]\nsource = "clips"\n[crepa]\ntau = "one"\n')
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert "crepa.tau: expected a valid number" in result.stderr and "Traceback" not in result.stderr


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npretrained = "x"\n[data]\nsource = "clips"\n')
    config = load_config(path, ["train.max_steps=7", "crepa.weight=1.0", "optim.lr_scheduler=cosine"])
    assert (
        config.train.max_steps == 7 and config.crepa.weight == 1.0 and config.optim.lr_scheduler == "cosine"
    )
    assert config.data.source == (tmp_path / "clips").resolve()
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_start_up_summary_names_every_trainer_option(tiny_world):
    """Printed when training starts: each option of issue 22 with its value."""
    from crepa.train.setup import startup_summary

    overrides = ["data.caption_dropout=0.1", "ema.enabled=true", 'train.loss_weighting="min_snr"']
    line = startup_summary(load_config(tiny_world("wan"), overrides))
    for option in ("data.caption_dropout=0.1", "train.loss_weighting=min_snr", "ema.enabled=True"):
        assert option in line
    for key in ("train.timestep_sampling=", "lora.variant=lora", "train.snr_gamma=", "ema.decay="):
        assert key in line
