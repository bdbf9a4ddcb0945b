"""A run with every trainer option at its default gives, bit for bit, the weights the trainer gave
before those options existed: the checksums below were made with the unmodified trainer (commit
59b6a4c) on this test's run files. A change that alters a default run's numbers fails here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from crepa.config import load_config
from crepa.precompute import precompute
from crepa.train.recipe import train
from helpers import write_world

# (family, overrides) -> sha256 over the trained LoRA and projector tensors (sorted names, raw bytes);
# the run file is test_train's without its timestep_sampling line, so every key has its default.
PINNED = {
    ("wan", ()): "2d8a77fc6889b91afba1533a0b6b48b112098c88313def1b214424c07b7d940b",
    ("wan", ('train.timestep_sampling="uniform"',)): (
        "11d21213617c127611de3ee38a1c5a35d29e1f18418a2e6a6952672a893d9c82"
    ),
    ("cogvideox", ()): "5d09d09fb7d6d7fdfed34b05f8464d16a3153e576b0b58ecb62d8893f56b3c62",
}

# The stack the checksums were made on: other torch releases (CPU kernels) and transformers releases
# (the tiny text encoder's initial weights) give other bits, e.g. the GPU image's torch 2.11 /
# transformers 5.17, so elsewhere the pins say nothing and the test is skipped, naming both stacks.
PINNED_ON = {"torch": "2.13", "transformers": "5.25"}


def weights_checksum(output: Path) -> str:
    """sha256 of every tensor of the exported LoRA and projector, by sorted name, over raw bytes."""
    digest = hashlib.sha256()
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors"):
        tensors = load_file(output / name)
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("family", "overrides"), list(PINNED))
def test_default_run_weights_are_pinned(tmp_path, family, overrides):
    here = {"torch": torch.__version__, "transformers": transformers.__version__}
    if any(not here[name].startswith(f"{release}.") for name, release in PINNED_ON.items()):
        pytest.skip(f"checksums made on {PINNED_ON}; this stack is {here}")
    run = write_world(tmp_path, family)
    run.write_text(run.read_text().replace('timestep_sampling = "uniform"\n', ""))
    precompute(load_config(run), progress=False)
    config = load_config(run, ["train.max_steps=2", *overrides])
    train(config, progress=False)
    assert weights_checksum(config.output.dir) == PINNED[(family, overrides)]
