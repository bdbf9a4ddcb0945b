"""[ema]: the EMA a run saves equals an EMA rolled by hand over the raw weights its checkpoints hold
(LoRA, the whole transformer, the projector, the RepVideo gates); the final files hold the EMA under
the default names and the raw weights under *_raw names; a swap for validation restores every bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from crepa.config import load_config
from crepa.precompute import precompute
from crepa.train.ema import WeightEMA
from crepa.train.recipe import train
from helpers import set_wan_layers, write_world

DECAY = 0.9


def test_update_every_and_start_step_against_a_loop():
    weight = nn.Parameter(torch.zeros(3))
    ema = WeightEMA({"w": weight}, DECAY, update_every=2, start_step=1, device="cpu")
    expected = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 8):
        with torch.no_grad():
            weight.copy_(torch.tensor([step, -2.0 * step, step**2], dtype=torch.float32))
        ema.update(step)
        if step <= 1:
            expected = weight.detach().double().clone()
        elif (step - 1) % 2 == 0:
            expected = DECAY * expected + (1 - DECAY) * weight.detach().double()
        torch.testing.assert_close(ema.shadows["w"].double(), expected, rtol=0, atol=1e-6)


def test_swapped_in_restores_the_trained_weights_bit_for_bit():
    weight = nn.Parameter(torch.randn(5))
    ema = WeightEMA({"w": weight}, DECAY)
    trained = weight.detach().clone()
    ema.shadows["w"].copy_(torch.arange(5.0))
    with ema.swapped_in():
        assert torch.equal(weight.detach(), torch.arange(5.0))
    assert torch.equal(weight.detach(), trained)


@pytest.fixture(scope="module")
def wan_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    run = write_world(root, "wan")
    set_wan_layers(root / "pipe", 4)  # window 2 gates block 2
    precompute(load_config(run), progress=False)
    return run


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("lora", []),
        (
            "full-gates",
            ["lora.enabled=false", "repvideo.enabled=true", "repvideo.window=2", "repvideo.gate_init=0.5"],
        ),
    ],
)
def test_saved_ema_equals_a_hand_rolled_ema_of_the_checkpoints(wan_world, name, overrides):
    steps = 5
    config = load_config(
        wan_world,
        [
            *overrides,
            f'output.dir="{name}"',
            f"train.max_steps={steps}",
            "train.checkpoint_every=1",
            f"train.keep_checkpoints={steps}",
            "optim.lr=1e-2",
            "ema.enabled=true",
            f"ema.decay={DECAY}",
            "ema.start_step=1",
            "ema.update_every=2",
        ],
    )
    train(config, progress=False)
    checkpoints = config.output.dir / "checkpoints"
    raw = [load_file(checkpoints / f"step-{step:06d}/trainable.safetensors") for step in range(1, steps + 1)]
    expected = {key: value.double() for key, value in raw[0].items()}  # up to start_step: the weights
    for step in range(2, steps + 1):
        if (step - 1) % 2 == 0:
            expected = {
                key: DECAY * e + (1 - DECAY) * raw[step - 1][key].double() for key, e in expected.items()
            }
        saved = load_file(checkpoints / f"step-{step:06d}/ema.safetensors")
        assert saved.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(saved[key].double(), expected[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(raw[-1][key], saved[key]) for key in saved)  # the EMA lags the weights
    # final files: EMA under the default names, raw weights beside them
    side = {"projector": "projector.safetensors"}
    if name == "full-gates":
        side["repvideo_gates"] = "repvideo_gates.safetensors"
        transformer = load_file(next((config.output.dir / "transformer").glob("*.safetensors")))
        transformer_raw = load_file(next((config.output.dir / "transformer_raw").glob("*.safetensors")))
        for key in ("blocks.0.attn1.to_q.weight", "proj_out.weight"):
            torch.testing.assert_close(
                transformer[key].double(), expected[f"transformer.{key}"], rtol=0, atol=1e-6
            )
            assert torch.equal(transformer_raw[key], raw[-1][f"transformer.{key}"])
    else:
        lora = load_file(config.output.dir / "pytorch_lora_weights.safetensors")
        lora_raw = load_file(config.output.dir / "pytorch_lora_weights_raw.safetensors")
        key = next(k for k in lora if "lora_B" in k)
        trained = "transformer." + key.removeprefix("transformer.").replace(".weight", ".default.weight")
        torch.testing.assert_close(lora[key].double(), expected[trained], rtol=0, atol=1e-6)
        assert torch.equal(lora_raw[key], raw[-1][trained])
    for module, file in side.items():
        final, final_raw = (
            load_file(config.output.dir / file),
            load_file(config.output.dir / file.replace(".", "_raw.", 1)),
        )
        trained_keys = [key for key in final if f"{module}.{key}" in expected]  # buffers are not trained
        assert trained_keys
        for key in trained_keys:
            torch.testing.assert_close(final[key].double(), expected[f"{module}.{key}"], rtol=0, atol=1e-6)
            assert torch.equal(final_raw[key], raw[-1][f"{module}.{key}"])


@pytest.mark.slow
def test_ema_under_fsdp2_equals_data_parallel_and_resumes(wan_world):
    """The EMA of sharded weights (local shards, gathered to save) equals the DDP run's EMA; the
    EMA in host memory (device cpu) gives the same numbers; a resumed FSDP2 run restores it."""
    from helpers import assert_same_tensors, launch

    common = [
        "train.max_steps=4",
        "train.batch_size=1",
        "train.checkpoint_every=2",
        "ema.enabled=true",
        "ema.decay=0.5",
    ]
    root = wan_world.parent
    launch(wan_world, *common, 'output.dir="ema-ddp"')
    launch(wan_world, *common, 'output.dir="ema-fsdp"', 'ema.device="cpu"', sharded=True)
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_raw.safetensors",
        "projector.safetensors",
    ):
        assert_same_tensors(root / "ema-ddp" / name, root / "ema-fsdp" / name, atol=1e-6)
    assert_same_tensors(
        root / "ema-ddp/checkpoints/step-000002/ema.safetensors",
        root / "ema-fsdp/checkpoints/step-000002/ema.safetensors",
        atol=1e-6,
    )
    import shutil

    shutil.copytree(root / "ema-fsdp/checkpoints/step-000002", root / "ema-resumed/checkpoints/step-000002")
    launch(wan_world, *common, 'output.dir="ema-resumed"', 'ema.device="cpu"', sharded=True, resume=True)
    assert_same_tensors(
        root / "ema-fsdp/pytorch_lora_weights.safetensors",
        root / "ema-resumed/pytorch_lora_weights.safetensors",
        atol=1e-6,
    )
