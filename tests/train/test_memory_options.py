"""The memory options change where weights and activations live, not what is trained: real tiny Wan
runs (precompute -> train) give bit-equal LoRA weights with and without partial checkpointing and
block offload; fp8 weights give the LoRA of a bf16-path run over weights rounded to fp8 by hand.
Impossible combinations fail before any weight loads (exit 2), naming the key and the alternative."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file
from test_train import losses, write_world
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from crepa.config import ConfigError, LoraSection, load_config
from crepa.generation import SAMPLES_FILE, load_pipeline
from crepa.models.memory import offload_blocks, set_gradient_checkpointing
from crepa.models.registry import ModelFamily, detect_family
from crepa.models.tiny import tiny_inputs, tiny_transformer
from crepa.precompute import precompute
from crepa.train.lora import add_lora
from crepa.train.parallel import launch_sharding
from crepa.train.recipe import train
from crepa.train.validation import run_validation

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory-world")
    run = write_world(root, "wan")
    precompute(load_config(run), progress=False)
    return run


def trained_lora(run: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    config = load_config(run, [*overrides, "train.max_steps=2", "validation.every=0", f'output.dir="{name}"'])
    summary = train(config, progress=False)
    assert summary.steps == 2 and summary.skipped_nonfinite == 0
    return load_file(config.output.dir / "pytorch_lora_weights.safetensors")


def assert_equal_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_partial_checkpointing_recomputes_exactly_the_first_n_blocks():
    """One forward + backward of the tiny Wan transformer (2 blocks) with N = 1: block 0's forward runs
    twice (forward, then recomputed in backward), block 1's once (counted around ``forward``)."""
    transformer = tiny_transformer("wan")
    family = detect_family(transformer)
    transformer.requires_grad_(True)
    set_gradient_checkpointing(transformer, family, 1)
    calls = [0, 0]
    for index, block in enumerate(family.blocks(transformer)):

        def counted(*args, forward=block.forward, index=index, **kwargs):
            calls[index] += 1
            return forward(*args, **kwargs)

        block.forward = counted
    transformer(**tiny_inputs("wan", transformer))[0].square().mean().backward()
    assert calls == [2, 1]


def test_checkpointing_settings_train_bit_equal(world):
    reference = trained_lora(world, "ckpt-all", "model.gradient_checkpointing=true")
    assert_equal_tensors(trained_lora(world, "ckpt-none", "model.gradient_checkpointing=false"), reference)
    assert_equal_tensors(trained_lora(world, "ckpt-one", "model.gradient_checkpointing=1"), reference)


def test_block_offload_trains_bit_equal(world):
    reference = trained_lora(world, "offload-none", "model.gradient_checkpointing=true")
    assert_equal_tensors(trained_lora(world, "offload-two", "model.offload_blocks=2"), reference)


def test_block_offload_over_fp8_weights_trains_bit_equal(world):
    """Offloaded blocks stream their fp8-stored weights; layerwise casting casts the streamed copies."""
    reference = trained_lora(world, "fp8-offload-none", 'model.base_precision="fp8"')
    offloaded = trained_lora(world, "fp8-offload-two", 'model.base_precision="fp8"', "model.offload_blocks=2")
    assert_equal_tensors(offloaded, reference)


def round_block_weights_to_fp8(transformer_dir: Path) -> None:
    """Rewrite the saved transformer with its block Linear weights and biases passed through fp8 (e4m3)."""
    transformer = diffusers.WanTransformer3DModel.from_pretrained(transformer_dir)
    for name, module in transformer.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            for param in module.parameters():
                param.data = param.data.to(torch.float8_e4m3fn).to(param.dtype)
    transformer.save_pretrained(transformer_dir)


def test_fp8_weights_train_as_bf16_path_over_fp8_rounded_weights(world):
    """fp8 storage is lossy only through the rounding: the run equals, bit for bit, a run without fp8 on
    weights rounded to fp8 beforehand; against the unrounded weights the LoRA differs by the rounding
    (stated tolerance: the first step's loss within 5 %; the LoRA itself, a two-step Adam update of a
    random tiny model, follows gradient signs and is not close). The LoRA loads on the bf16 base model."""
    fp8 = trained_lora(world, "fp8", 'model.base_precision="fp8"')
    plain = trained_lora(world, "plain")
    transformer_dir = world.parent / "pipe" / "transformer"
    original = world.parent / "transformer-original"
    shutil.copytree(transformer_dir, original)
    try:
        round_block_weights_to_fp8(transformer_dir)
        rounded = trained_lora(world, "rounded")
    finally:
        shutil.rmtree(transformer_dir)
        original.rename(transformer_dir)
    assert_equal_tensors(fp8, rounded)
    assert any(not torch.equal(fp8[key], plain[key]) for key in plain)  # the rounding did change the run
    first_loss = {name: losses(world.parent / name)[0] for name in ("fp8", "plain")}
    assert abs(first_loss["fp8"] / first_loss["plain"] - 1) < 0.05, first_loss
    pipeline = diffusers.WanPipeline.from_pretrained(world.parent / "pipe", torch_dtype=torch.bfloat16)
    pipeline.load_lora_weights(world.parent / "fp8")
    loaded = {name: param for name, param in pipeline.transformer.named_parameters() if "lora_B" in name}
    assert len(loaded) == len([key for key in fp8 if "lora_B" in key]) > 0
    assert pipeline.transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.offload_blocks=1", "model.gradient_checkpointing=false"],
            r"model\.offload_blocks: .*model\.gradient_checkpointing = true",
        ),
        (
            ["model.offload_activations=true", "model.gradient_checkpointing=false"],
            r"model\.offload_activations: .*model\.gradient_checkpointing = true",
        ),
        (
            ["model.offload_activations=true", "repvideo.enabled=true"],
            r"model\.offload_activations: RepVideo .*model\.offload_activations = false",
        ),
        (["model.gradient_checkpointing=5"], r"model\.gradient_checkpointing: 5 blocks, but the model has 2"),
        (
            ['model.base_precision="fp8"', "lora.enabled=false"],
            r"model\.base_precision: 'fp8' .*lora\.enabled = true",
        ),
        (['optim.name="adamw8bit"'], r"optim\.name: 'adamw8bit' .*optim\.name = 'adamw'"),
    ],
)
def test_impossible_combinations_exit_2_before_loading(world, overrides, message):
    if "adamw8bit" in overrides[0] and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("8-bit AdamW runs here")
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = subprocess.run(
        [sys.executable, "-m", "crepa", "train", str(world), *sets, "--set", 'output.dir="refused"'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr
    assert not (world.parent / "refused" / "checkpoints").exists()


def test_offload_under_fsdp_or_ddp_and_fp8_under_fsdp_are_refused(world, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match=r"model\.offload_blocks: .*model\.offload_blocks = 0"):
        launch_sharding(load_config(world, ["model.offload_blocks=1"]))
    with pytest.raises(ConfigError, match=r"model\.base_precision: 'fp8' under FSDP .*'bf16'"):
        launch_sharding(load_config(world, ['model.base_precision="fp8"']))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("WORLD_SIZE", "2")  # DDP wraps a model whose weights are all on its GPU
    with pytest.raises(ConfigError, match=r"model\.offload_blocks: block offload under DDP .*= 0"):
        launch_sharding(load_config(world, ["model.offload_blocks=1"]))
    assert launch_sharding(load_config(world, ['model.base_precision="fp8"'])) == "none"  # fp8 + DDP is fine


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")),
    reason="needs CUDA and bitsandbytes",
)
def test_adamw8bit_trains_close_to_adamw(world):
    """8-bit moments: the LoRA after two steps is within 5 % (relative L2) of AdamW's."""
    exact = trained_lora(world, "adamw")
    eight_bit = trained_lora(world, "adamw8bit", 'optim.name="adamw8bit"')
    for key in exact:
        assert (eight_bit[key] - exact[key]).norm() / exact[key].norm().clamp_min(1e-12) < 0.05, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_options_train_on_cuda(world):
    """On CUDA (bf16 weights, the real pinned-memory offload copies): lossless options give the
    baseline's LoRA up to CUDA's non-deterministic reductions (relative L2 below 1e-2), fp8 a first
    loss within 5 %."""
    reference = trained_lora(world, "cuda-reference")
    lossless = {
        "cuda-offload": ["model.offload_blocks=2"],
        "cuda-activations": ["model.offload_activations=true"],
        "cuda-ckpt-one": ["model.gradient_checkpointing=1"],
    }
    for name, overrides in lossless.items():
        lora = trained_lora(world, name, *overrides)
        for key in reference:
            difference = (lora[key] - reference[key]).norm() / reference[key].norm().clamp_min(1e-12)
            assert difference < 1e-2, (name, key, float(difference))
    fp8 = trained_lora(world, "cuda-fp8", 'model.base_precision="fp8"')
    first = {name: losses(world.parent / name)[0] for name in ("cuda-fp8", "cuda-reference")}
    assert abs(first["cuda-fp8"] / first["cuda-reference"] - 1) < 0.05, first
    streamed = trained_lora(world, "cuda-fp8-offload", 'model.base_precision="fp8"', "model.offload_blocks=2")
    for key in fp8:  # fp8 weights streamed from pinned memory: as fp8 on the GPU
        difference = (streamed[key] - fp8[key]).norm() / fp8[key].norm().clamp_min(1e-12)
        assert difference < 1e-2, (key, float(difference))


def checkpointed_lora_wan(num_layers: int) -> tuple[nn.Module, ModelFamily]:
    """The tiny Wan transformer (seed 0) with LoRA (rank 4), every block checkpointed."""
    transformer = tiny_transformer("wan", num_layers=num_layers)
    family = detect_family(transformer)
    add_lora(transformer, family, LoraSection(rank=4))
    set_gradient_checkpointing(transformer, family, True)
    return transformer, family


def test_offload_hosts_only_the_frozen_weights_of_the_offloaded_blocks():
    """model.offload_blocks = 2 on a LoRA model: the streamer hosts exactly the frozen weights of blocks 0
    and 1 of 3 (never LoRA, whose gradients and updates must stay where it trains), block 2 has no hook;
    the LoRA of the offloaded blocks still gets its gradients through the copies."""
    transformer, family = checkpointed_lora_wan(num_layers=3)
    blocks = family.blocks(transformer)
    streamer = offload_blocks(transformer, family, 2, torch.device("cpu"))

    for index, block in enumerate(blocks[:2]):
        expected = [p for p in block.parameters() if not p.requires_grad]
        assert [id(p) for p in streamer.params[index]] == [id(p) for p in expected], index
    assert len(streamer.params) == 2 and not blocks[2]._forward_pre_hooks
    assert not any(p.requires_grad for params in streamer.params for p in params)
    inputs = tiny_inputs("wan", transformer)
    transformer(**inputs)[0].square().mean().backward()
    trainables = [p for block in blocks[:2] for p in block.parameters() if p.requires_grad]
    assert trainables and all(p.grad is not None for p in trainables)
    assert any(p.grad.abs().sum() > 0 for p in trainables)  # lora_B (lora_A's are 0: B starts at 0)


def test_offload_prefetches_the_block_that_runs_next_forward_and_in_the_recompute():
    """Offloading 3 of 4 checkpointed blocks: when block i starts, the copy of the block that runs next
    is already under way: i + 1 in the forward, i - 1 in the backward's recompute (reverse order); each
    block is copied once per pass, never ahead of use past the offloaded ones, and nothing stays on the
    device after the step."""
    transformer = tiny_transformer("wan", num_layers=4)
    family = detect_family(transformer)
    transformer.requires_grad_(False)
    family.blocks(transformer)[0].ffn.net[2].requires_grad_(True)  # something to backpropagate to
    set_gradient_checkpointing(transformer, family, True)
    blocks = family.blocks(transformer)
    streamer = offload_blocks(transformer, family, 3, torch.device("cpu"))
    copies: list[int] = []
    prefetch = streamer.prefetch

    def counted(index: int) -> None:
        if 0 <= index < 3 and index not in streamer.in_flight:
            copies.append(index)
        prefetch(index)

    streamer.prefetch = counted
    seen: list[tuple[int, list[int]]] = []  # (block, copies under way once its own are in place)
    for index, block in enumerate(blocks[:3]):
        block.register_forward_pre_hook(
            lambda *_, index=index: seen.append((index, sorted(streamer.in_flight)))
        )
    inputs = tiny_inputs("wan", transformer)
    transformer(**inputs)[0].square().mean().backward()
    assert seen == [(0, [1]), (1, [2]), (2, []), (2, [1]), (1, [0]), (0, [])]
    assert copies == [0, 1, 2, 2, 1, 0]
    assert not streamer.in_flight


class HostReads(TorchDispatchMode):
    """Records every op, but the copies that stream weights in, that reads a tensor stored in one of
    ``storages`` (untyped-storage data pointers)."""

    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __init__(self, storages: set[int]) -> None:
        super().__init__()
        self.storages = storages
        self.ops: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if func not in self.COPIES and any(t.untyped_storage().data_ptr() in self.storages for t in tensors):
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_offload_backward_uses_the_streamed_copies_and_every_block_ends_on_its_host_copies(device):
    """Offloading 2 of 3 checkpointed blocks of a LoRA model, one forward + backward:
    - no op of the backward reads a host copy (autograd keeps the very weight tensors a recomputed
      block computed with, e.g. its norms' weights: on a GPU a host tensor there fails);
    - afterwards the offloaded blocks' modules hold their host copies again, on the CPU (the recompute
      runs whole blocks, so no streamed copy outlives its block's backward) and nothing is in flight;
    - the gradients (input and LoRA) are those of the same model without offload (bit-equal on the CPU)."""
    device = torch.device(device)
    reference, family = checkpointed_lora_wan(num_layers=3)
    transformer, _ = checkpointed_lora_wan(num_layers=3)
    reference.to(device)
    streamer = offload_blocks(transformer, family, 2, device)
    hosted = [[param.data_ptr() for param in params] for params in streamer.params]
    inputs = {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in tiny_inputs("wan", transformer).items()
    }
    gradients = []
    for model, reads in ((reference, None), (transformer, HostReads({p for ps in hosted for p in ps}))):
        latents = inputs["hidden_states"].clone().requires_grad_(True)
        loss = model(**{**inputs, "hidden_states": latents})[0].square().mean()
        if reads is None:
            loss.backward()
        else:
            with reads:
                loss.backward()
            assert not reads.ops, reads.ops
        lora = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        gradients.append({"hidden_states": latents.grad, **lora})
    for index, block in enumerate(family.blocks(transformer)[:2]):
        frozen = [p for p in block.parameters() if not p.requires_grad]
        assert [p.data_ptr() for p in frozen] == hosted[index], index
        assert all(p.device.type == "cpu" for p in frozen), index
    assert not streamer.in_flight
    expected, got = gradients
    assert expected.keys() == got.keys() and len(expected) > 1
    exact = device.type == "cpu"
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, msg=name
        )


def test_validation_leaves_an_offloaded_transformer_in_place_and_writes_the_same_clip(
    world, tmp_path, monkeypatch
):
    """Validation during a run with model.offload_blocks (both blocks of the tiny Wan offloaded): the
    pipeline moves its other components but never the transformer (a pipeline's ``.to`` would move
    every hosted block to the GPU at once; on the CPU such a move changes no storage, so a spy on the
    transformer's ``_apply``, which every ``.to`` goes through, sees it); the blocks stream in as they
    run, end on their host copies, and the clip is bitwise the one of the same weights not offloaded."""
    config = load_config(world)
    transformer_dir = world.parent / "pipe" / "transformer"
    plain = diffusers.WanTransformer3DModel.from_pretrained(transformer_dir).requires_grad_(False)
    family = detect_family(plain)
    expected = run_validation(config, family, plain, tmp_path / "plain", step=1)

    offloaded = diffusers.WanTransformer3DModel.from_pretrained(transformer_dir).requires_grad_(False)
    streamer = offload_blocks(offloaded, family, 2, torch.device("cpu"))
    hosted = [[param.data_ptr() for param in params] for params in streamer.params]
    assert all(hosted)
    moves, streamed = [], []
    apply, prefetch = offloaded._apply, streamer.prefetch
    monkeypatch.setattr(
        offloaded, "_apply", lambda *args, **kwargs: moves.append(args) or apply(*args, **kwargs)
    )
    monkeypatch.setattr(streamer, "prefetch", lambda index: streamed.append(index) or prefetch(index))
    got = run_validation(config, family, offloaded, tmp_path / "offloaded", step=1)

    assert not moves
    assert {0, 1} <= set(streamed)
    for index, block in enumerate(family.blocks(offloaded)):
        assert [p.data_ptr() for p in block.parameters()] == hosted[index], index
    assert not streamer.in_flight
    digests = [
        [json.loads(line)["frames_sha256"] for line in (path / SAMPLES_FILE).read_text().splitlines()]
        for path in (expected, got)
    ]
    assert digests[0] == digests[1] and len(digests[0]) == 1
    assert (got / "prompt-0.mp4").stat().st_size > 0


def test_cpu_offload_of_a_pipeline_around_an_offloaded_transformer_is_refused_before_loading(world):
    """diffusers' model CPU offload moves the whole transformer to the GPU while it runs, hosted blocks
    and all: with model.offload_blocks that is refused, naming the option, before the pipeline loads
    (model.pretrained points nowhere, so loading would fail differently)."""
    config = load_config(world)
    transformer_dir = world.parent / "pipe" / "transformer"
    offloaded = diffusers.WanTransformer3DModel.from_pretrained(transformer_dir).requires_grad_(False)
    family = detect_family(offloaded)
    offload_blocks(offloaded, family, 1, torch.device("cpu"))
    model = config.model.model_copy(update={"pretrained": str(world.parent / "missing")})
    with pytest.raises(ValueError, match=r"offload: .*model\.offload_blocks.*drop offload"):
        load_pipeline(model, family, offloaded, device="cuda", offload=True)
