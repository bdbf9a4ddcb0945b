"""Representation diagnostics on tiny diffusers transformers: per-layer adjacent-frame similarity and CKNNA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from crepa.eval.layers import (
    adjacent_frame_similarity,
    block_cknna,
    block_frame_features,
    layer_similarity_profile,
)
from crepa.models import BlockCapture
from crepa.models.tiny import tiny_transformer


def wan_calls(seed: int, count: int = 2, frames: int = 3) -> list[dict]:
    """Forward calls of the tiny Wan model: latents (B, C, F, H, W) at a few noise levels."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(2, 4, frames, 8, 8, generator=generator)
    text = torch.randn(2, 6, 16, generator=generator)
    calls = []
    for level in torch.linspace(0.2, 0.8, count):
        noisy = (1 - level) * clean + level * torch.randn(clean.shape, generator=generator)
        calls.append(
            {
                "hidden_states": noisy,
                "timestep": torch.full((2,), 1000 * float(level)),
                "encoder_hidden_states": text,
            }
        )
    return calls


def naive_similarity(grid: torch.Tensor) -> float:
    """Mean over batch, frame pairs and positions of the token cosine, with explicit loops."""
    batch, frames, height, width, _ = grid.shape
    values = []
    for b in range(batch):
        for f in range(frames - 1):
            for y in range(height):
                for x in range(width):
                    u, v = grid[b, f, y, x].double(), grid[b, f + 1, y, x].double()
                    values.append(float(u @ v / (u.norm() * v.norm())))
    return sum(values) / len(values)


def test_adjacent_frame_similarity_closed_forms():
    frame = torch.randn(1, 1, 3, 4, 5)
    assert adjacent_frame_similarity(torch.cat([frame, frame, 2 * frame], dim=1)) == pytest.approx(
        torch.ones(1, 2)
    )
    assert adjacent_frame_similarity(torch.cat([frame, -frame], dim=1)).item() == pytest.approx(-1.0)
    basis = torch.eye(4).view(1, 4, 1, 1, 4)  # every frame orthogonal to the next
    assert adjacent_frame_similarity(basis) == pytest.approx(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="F' >= 2"):
        adjacent_frame_similarity(frame)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_layer_profile_equals_per_block_capture_with_loops(family):
    transformer = tiny_transformer(family, seed=0).eval()
    if family == "wan":
        calls = wan_calls(seed=1)
    else:  # CogVideoX: (B, F, C, H, W) latents, text of max_text_seq_length tokens
        generator = torch.Generator().manual_seed(1)
        calls = [
            {
                "hidden_states": torch.randn(1, 3, 4, 8, 8, generator=generator),
                "timestep": torch.tensor([500]),
                "encoder_hidden_states": torch.randn(1, 8, 8, generator=generator),
            }
        ]
    profile = layer_similarity_profile(transformer, calls)
    num_blocks = len(profile)
    assert num_blocks == 2
    for index in range(num_blocks):
        capture = BlockCapture(transformer, index, detach=True)
        per_call = []
        with torch.no_grad():
            for call in calls:
                transformer(**call)
                per_call.append(naive_similarity(capture.pop()))
        capture.remove()
        assert profile[index].item() == pytest.approx(sum(per_call) / len(per_call), abs=1e-5)


def test_layer_profile_sees_a_lora_and_not_a_disabled_one():
    transformer = tiny_transformer("wan", seed=0).eval()
    calls = wan_calls(seed=2)
    base = layer_similarity_profile(transformer, calls)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    with_lora = layer_similarity_profile(transformer, calls)
    transformer.disable_adapters()
    disabled = layer_similarity_profile(transformer, calls)
    assert not torch.allclose(with_lora, base, atol=1e-4)
    torch.testing.assert_close(disabled, base)


def test_block_cknna_is_one_against_its_own_hidden_states_and_low_against_noise():
    transformer = tiny_transformer("wan", seed=0).eval()
    calls = wan_calls(seed=3, count=4, frames=5)  # 4 calls x 2 clips x 5 latent frames = 40 samples
    capture = BlockCapture(transformer, 1, detach=True)
    own_grids = []
    with torch.no_grad():
        for call in calls:
            transformer(**call)
            own_grids.append(capture.pop())
    capture.remove()
    assert block_cknna(transformer, 1, zip(calls, own_grids, strict=True)) == pytest.approx(1.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(2, 5, 3, 3, 32, generator=generator) for _ in calls]
    assert abs(block_cknna(transformer, 1, zip(calls, noise, strict=True))) < 0.3


def test_block_features_go_through_the_projector_and_average_teacher_frame_groups():
    transformer = tiny_transformer("wan", seed=0).eval()
    calls = wan_calls(seed=4, count=1, frames=2)
    projector = torch.nn.Linear(24, 7)
    teacher = torch.arange(2 * 4 * 2 * 2 * 3, dtype=torch.float32).view(
        2, 4, 2, 2, 3
    )  # 4 frames for 2 latent ones
    student, teacher_rows = block_frame_features(
        transformer, 0, zip(calls, [teacher], strict=True), projector
    )
    assert student.shape == (4, 7) and teacher_rows.shape == (4, 3)
    raw, _ = block_frame_features(transformer, 0, zip(calls, [teacher], strict=True))
    with torch.no_grad():  # the projector is linear, so it commutes with the spatial mean
        torch.testing.assert_close(student, projector(raw))
    expected = teacher.view(2, 2, 2, 2, 2, 3).mean(dim=2).mean(dim=(2, 3)).flatten(0, 1)
    torch.testing.assert_close(teacher_rows, expected)
