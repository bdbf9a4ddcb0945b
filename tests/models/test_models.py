"""Capture on every supported diffusers video transformer, with real classes at tiny sizes.

Expected grids, patch sizes, families and LoRA target counts are written out here from the
diffusers sources, independently of the registry.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.loaders import PeftAdapterMixin
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from crepa import CrepaConfig, CrepaRegularizer
from crepa.models import detect_family
from crepa.models.tiny import TINY_MODELS, tiny_inputs, tiny_transformer

BATCH, FRAMES, HEIGHT, WIDTH = 2, 4, 8, 12  # latent sizes; 8 x 12 keeps rows and columns distinct
TEACHER_DIM = 16

# tiny config -> (registry family, patch size (t, h, w), block lists in execution order)
EXPECTED = {
    "cogvideox": ("cogvideox", (1, 2, 2), ("transformer_blocks",)),
    "cogvideox_1_5": ("cogvideox", (2, 2, 2), ("transformer_blocks",)),
    "hunyuanvideo": ("hunyuanvideo", (1, 2, 2), ("transformer_blocks", "single_transformer_blocks")),
    "wan": ("wan", (1, 2, 2), ("blocks",)),
    "wan2_2_ti2v": ("wan2_2_ti2v", (1, 2, 2), ("blocks",)),
    "skyreels_v2": ("skyreels_v2", (1, 2, 2), ("blocks",)),
    "ltx_video": ("ltx_video", (1, 1, 1), ("transformer_blocks",)),
    "mochi": ("mochi", (1, 2, 2), ("transformer_blocks",)),
    "cosmos": ("cosmos", (1, 2, 2), ("transformer_blocks",)),
    "cosmos_predict2": ("cosmos_predict2", (1, 2, 2), ("transformer_blocks",)),
    "allegro": ("allegro", (1, 2, 2), ("transformer_blocks",)),
}
NAMES = list(EXPECTED)


def test_every_tiny_config_is_covered():
    assert set(TINY_MODELS) == set(EXPECTED)


def expected_grid(name: str) -> tuple[int, int, int]:
    patch_t, patch_h, patch_w = EXPECTED[name][1]
    return FRAMES // patch_t, HEIGHT // patch_h, WIDTH // patch_w


def make_inputs(name: str, transformer: nn.Module, seed: int = 0) -> dict:
    return tiny_inputs(
        name,
        transformer,
        batch=BATCH,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
    )


def regularizer(transformer: nn.Module, block_index: int = 0) -> CrepaRegularizer:
    config = CrepaConfig(block_index=block_index, projector_hidden_dim=32)
    return CrepaRegularizer(transformer, config, teacher_dim=TEACHER_DIM)


def silence_attention(block: nn.Module) -> None:
    """Zero every attention output projection of ``block`` (test-only weight surgery).

    Every family's first block attends over all video tokens (full 3-D attention), so a change
    in one latent frame reaches every frame of its output. With the attention outputs at zero the
    block acts token by token (norms, modulation, MLP and the residual all are per token), and a
    perturbation of one latent position must land on exactly one cell of the captured grid.
    """
    projections = [module for name, module in block.named_modules() if name.endswith("to_out.0")]
    assert projections, "block 0 has no attention output projection to silence"
    with torch.no_grad():
        for linear in projections:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


@pytest.mark.parametrize("name", NAMES)
def test_grid_shape_and_one_latent_position_lands_on_one_token(name):
    """(F', H', W') = latent sizes / patch sizes; a perturbed latent (f, y, x) moves only token
    (f // p_t, y // p_h, x // p_w) of the block-0 grid (for p_t = 2 both latent frames of a pair
    land on the same token frame). A wrong frame, row or column order of the capture moves
    another cell."""
    transformer = tiny_transformer(name).eval()
    family = detect_family(transformer)
    assert family.name == EXPECTED[name][0]
    silence_attention(family.blocks(transformer)[0])
    reg = regularizer(transformer)
    inputs = make_inputs(name, transformer)
    latents = torch.randn(
        BATCH,
        transformer.config.in_channels,
        FRAMES,
        HEIGHT,
        WIDTH,
        generator=torch.Generator().manual_seed(3),
    )

    def block0_grid(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            transformer(**{**inputs, **family.latent_kwargs(transformer, latents)})
        return reg.capture.pop()

    reference = block0_grid(latents)
    grid_f, grid_h, grid_w = expected_grid(name)
    assert reference.shape == (BATCH, grid_f, grid_h, grid_w, family.hidden_size(transformer))

    patch_t, patch_h, patch_w = EXPECTED[name][1]
    for frame, row, col in [(2, 5, 7), (3, 0, WIDTH - 1), (0, HEIGHT - 1, 0)]:
        perturbed = latents.clone()
        perturbed[1, :, frame, row, col] += 3.0
        change = (block0_grid(perturbed) - reference).abs().amax(dim=-1)  # (B, F', H', W')
        expected = torch.zeros_like(change, dtype=torch.bool)
        expected[1, frame // patch_t, row // patch_h, col // patch_w] = True
        assert change[expected].item() > 1e-3
        assert torch.equal(change > 1e-6, expected), (frame, row, col)


CHECKPOINTING = ("off", "on", "on_full_recompute")


def block0_gradients(name: str, checkpointing: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train mode, CREPA loss only: the projector and block 0 get gradients, later blocks none.

    "on_full_recompute" disables PyTorch's checkpoint early stop, so the backward recomputation
    runs block 0 to its end and fires its forward hook a second time; the capture must ignore it.
    """
    transformer = tiny_transformer(name).train()
    if checkpointing != "off":
        transformer.enable_gradient_checkpointing()
    family = detect_family(transformer)
    torch.manual_seed(1)
    reg = regularizer(transformer)
    with set_checkpoint_early_stop(checkpointing != "on_full_recompute"):
        transformer(**make_inputs(name, transformer))
    grid_f = expected_grid(name)[0]
    teacher = torch.randn(BATCH, grid_f, 3, 5, TEACHER_DIM, generator=torch.Generator().manual_seed(2))
    out = reg.loss(teacher, step=0)
    out.loss.backward()
    with pytest.raises(RuntimeError, match="no output of block"):  # nothing kept from the recomputation
        reg.capture.pop()

    for param in reg.projector.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0
    blocks = family.blocks(transformer)
    block0 = {key: param.grad for key, param in blocks[0].named_parameters() if param.grad is not None}
    assert any(grad.abs().sum() > 0 for grad in block0.values())
    assert all(param.grad is None for block in blocks[1:] for param in block.parameters())
    assert all(
        param.grad is None for key, param in transformer.named_parameters() if key.startswith("proj_out")
    )
    return block0, out.metrics["crepa/loss"]


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_projector_and_transformer_with_and_without_checkpointing(name):
    """The CREPA loss alone trains the projector and the blocks up to the captured one (and
    nothing after it); gradient checkpointing gives the same loss and the same gradients."""
    plain_grads, plain_loss = block0_gradients(name, "off")
    for mode in CHECKPOINTING[1:]:
        grads, loss = block0_gradients(name, mode)
        torch.testing.assert_close(loss, plain_loss)
        assert grads.keys() == plain_grads.keys()
        for key, grad in plain_grads.items():
            torch.testing.assert_close(grads[key], grad, msg=f"{mode}: {key}")


def record_block_outputs(blocks: list[nn.Module]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    for block in blocks:
        block.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
    return outputs


@pytest.mark.parametrize(
    ("name", "block_index"),
    [("wan", 0), ("wan", 1), ("cogvideox", 1), ("hunyuanvideo", 0), ("hunyuanvideo", 1)],
)
def test_capture_holds_the_chosen_block_only(name, block_index):
    """One global index runs through HunyuanVideo's dual-stream then single-stream blocks; the
    capture equals that block's video tokens and no other block's, and is released once read."""
    transformer = tiny_transformer(name).eval()
    own_blocks = [block for attr in EXPECTED[name][2] for block in getattr(transformer, attr)]
    outputs = record_block_outputs(own_blocks)
    reg = regularizer(transformer, block_index)
    with torch.no_grad():
        transformer(**make_inputs(name, transformer))
    grid = reg.capture.pop()
    assert len(outputs) == len(own_blocks)
    for index, tokens in enumerate(outputs):
        same = torch.equal(grid, tokens.unflatten(1, expected_grid(name)))
        assert same == (index == block_index), index
    with pytest.raises(RuntimeError, match="no output of block"):
        reg.capture.pop()


@pytest.mark.parametrize("name", NAMES)
def test_hooks_change_nothing_and_are_removable(name):
    transformer = tiny_transformer(name).eval()
    inputs = make_inputs(name, transformer)
    with torch.no_grad():
        original = transformer(**inputs).sample
        reg = regularizer(transformer)
        hooked = transformer(**inputs).sample
        reg.remove()
        after = transformer(**inputs).sample
    assert torch.equal(hooked, original)
    assert torch.equal(after, original)
    for module in transformer.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(RuntimeError):
        reg.capture.pop()


@pytest.mark.parametrize("name", NAMES)
def test_positional_and_keyword_calls_capture_the_same_grid(name):
    transformer = tiny_transformer(name).eval()
    inputs = make_inputs(name, transformer)
    reg = regularizer(transformer)
    leading = []  # the longest run of leading forward parameters that the inputs provide
    for parameter in inspect.signature(transformer.forward).parameters:
        if parameter not in inputs:
            break
        leading.append(parameter)
    positional = [inputs[key] for key in leading]
    keywords = {key: value for key, value in inputs.items() if key not in leading}
    assert len(positional) >= 3
    with torch.no_grad():
        transformer(**inputs)
        by_keyword = reg.capture.pop()
        transformer(*positional, **keywords)
        by_position = reg.capture.pop()
    assert torch.equal(by_position, by_keyword)


def test_unsupported_class_lists_the_supported_ones():
    supported = [
        "CogVideoXTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "WanTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
        "LTXVideoTransformer3DModel",
        "MochiTransformer3DModel",
        "CosmosTransformer3DModel",
        "AllegroTransformer3DModel",
    ]
    with pytest.raises(ValueError, match="does not support Linear") as error:
        CrepaRegularizer(nn.Linear(4, 4), CrepaConfig(block_index=0), teacher_dim=TEACHER_DIM)
    for class_name in supported:
        assert class_name in str(error.value)


def test_config_matching_no_family_is_an_error():
    transformer = tiny_transformer("cosmos", extra_pos_embed_type="sincos")
    with pytest.raises(ValueError, match="config matches no crepa family"):
        detect_family(transformer)


@pytest.mark.parametrize(("name", "depth"), [("wan", 2), ("hunyuanvideo", 2)])
def test_block_index_beyond_depth_is_a_clear_error(name, depth):
    transformer = tiny_transformer(name)
    with pytest.raises(ValueError, match=rf"block_index {depth} is outside .*valid: 0\.\.{depth - 1}"):
        regularizer(transformer, block_index=depth)


def test_packed_call_without_grid_sizes_names_them():
    transformer = tiny_transformer("ltx_video")
    inputs = make_inputs("ltx_video", transformer)
    for key in ("num_frames", "height", "width"):
        inputs.pop(key)
    grid = torch.stack(
        torch.meshgrid(torch.arange(FRAMES), torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    )
    inputs["video_coords"] = grid.flatten(1).float().expand(BATCH, -1, -1)
    regularizer(transformer)
    with pytest.raises(ValueError, match="without num_frames, height, width"):
        transformer(**inputs)


def test_frame_count_not_divisible_by_the_temporal_patch_is_a_clear_error():
    transformer = tiny_transformer("cogvideox_1_5")
    inputs = tiny_inputs("cogvideox_1_5", transformer, frames=3)
    regularizer(transformer)
    with pytest.raises(ValueError, match="patches 2 along latent frames, but the latents have 3"):
        transformer(**inputs)


# blocks x attention modules per block x projections (to_q, to_k, to_v, to_out.0)
EXPECTED_LORA_TARGETS = {
    "cogvideox": 2 * 1 * 4,
    "cogvideox_1_5": 2 * 1 * 4,
    "hunyuanvideo": 1 * 1 * 4 + 1 * 1 * 3,  # single-stream attention has no to_out
    "wan": 2 * 2 * 4,
    "wan2_2_ti2v": 2 * 2 * 4,
    "skyreels_v2": 2 * 2 * 4,
    "ltx_video": 1 * 2 * 4,
    "mochi": 2 * 1 * 4,
    "cosmos": 2 * 2 * 4,
    "cosmos_predict2": 2 * 2 * 4,
    "allegro": 1 * 2 * 4,
}


@pytest.mark.parametrize("name", NAMES)
def test_lora_regex_hits_only_attention_projections_in_the_blocks(name):
    transformer = tiny_transformer(name)
    family = detect_family(transformer)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=family.lora_target_regex)
    if isinstance(transformer, PeftAdapterMixin):
        transformer.add_adapter(config)
    else:  # Allegro's transformer has no add_adapter
        inject_adapter_in_model(config, transformer)

    modules = dict(transformer.named_modules())
    adapted = [key for key, module in modules.items() if isinstance(module, BaseTunerLayer)]
    assert len(adapted) == EXPECTED_LORA_TARGETS[name]
    for key in adapted:
        parts = key.split(".")
        assert parts[0] in EXPECTED[name][2] and parts[1].isdigit(), key
        projection = ".".join(parts[3:])
        assert projection in ("to_q", "to_k", "to_v", "to_out.0"), key
        attention = modules[".".join(parts[:3])]
        assert all(hasattr(attention, attr) for attr in ("to_q", "to_k", "to_v")), key

    # The capture still works on the adapted model and the LoRA weights of block 0 learn from it.
    reg = regularizer(transformer)
    transformer(**make_inputs(name, transformer))
    teacher = torch.randn(BATCH, expected_grid(name)[0], 2, 3, TEACHER_DIM)
    reg.loss(teacher, step=0).loss.backward()
    lora_grads = [
        param.grad for key, param in family.blocks(transformer)[0].named_parameters() if "lora_" in key
    ]
    assert lora_grads and any(grad is not None and grad.abs().sum() > 0 for grad in lora_grads)
