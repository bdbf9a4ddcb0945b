"""Pipeline components of tiny saved pipelines: loading, prompt encoding, latent normalisation.

References are independent of crepa's code: the text encoders and VAEs called directly, the
normalisation formulas written out from diffusers' pipelines (and LTX's own static method).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from crepa.models.pipelines import (
    decode_latents,
    encode_latents,
    encode_prompts,
    load_components,
    pipeline_family,
    resolve_family,
    student_grid,
)
from crepa.models.registry import get_family
from crepa.models.tiny_pipelines import save_tiny_pipeline

FAMILIES = ("cogvideox", "wan", "hunyuanvideo", "ltx_video")
PROMPTS = ["a red car drives on the road", "waves on the beach at night"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: str(save_tiny_pipeline(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def components(saved: dict[str, str]) -> dict[str, object]:
    return {family: load_components(path) for family, path in saved.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_pipeline_loads_without_transformer(family: str, saved: dict[str, str], components) -> None:
    index = json.loads(Path(saved[family], "model_index.json").read_text())
    entry = get_family(family)
    assert index["_class_name"] == entry.pipeline_class
    assert index["vae"] == ["diffusers", entry.vae_class]
    loaded = components[family]
    assert loaded.family is entry
    assert loaded.pipeline.transformer is None
    assert type(loaded.vae).__name__ == entry.vae_class
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert pipeline_family(saved[family]) is entry
    assert resolve_family(saved[family], "wan") is get_family("wan")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vae_has_the_family_compression(family: str, components) -> None:
    """1 + 2r frames of (2s x 3s) pixels -> 3 latent frames of 2 x 3 (the registry's real ratios)."""
    entry = get_family(family)
    r, s = entry.temporal_ratio, entry.spatial_ratio
    frames = torch.rand(1, 3, 1 + 2 * r, 2 * s, 3 * s) * 2 - 1
    latents = encode_latents(components[family].vae, frames)
    assert latents.shape[2:] == (3, 2, 3)


def _reference_normalisation(family: str, vae, raw: torch.Tensor) -> torch.Tensor:
    """The pipelines' formulas, written out per family (diffusers 0.42)."""
    if family in ("cogvideox", "hunyuanvideo"):
        return raw * vae.config.scaling_factor
    if family == "wan":  # WanPipeline decodes latents / (1 / std) + mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        return (raw - mean) / std
    return diffusers.LTXPipeline._normalize_latents(
        raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_normalisation_matches_the_pipeline(family: str, components) -> None:
    vae = components[family].vae
    entry = get_family(family)
    torch.manual_seed(1)
    frames = (
        torch.rand(1, 3, 1 + entry.temporal_ratio, 2 * entry.spatial_ratio, 2 * entry.spatial_ratio) * 2 - 1
    )
    raw = vae.encode(frames).latent_dist.mode()
    latents = encode_latents(vae, frames)
    expected = _reference_normalisation(family, vae, raw)
    assert not torch.allclose(latents, raw)  # the normalisation is not the identity for any tiny VAE
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    decoded = decode_latents(vae, latents)
    torch.testing.assert_close(decoded, vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def _ids(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_embeddings_come_from_the_family_text_encoder(family: str, components) -> None:
    loaded = components[family]
    pipe = loaded.pipeline
    out = encode_prompts(loaded, PROMPTS)
    length = loaded.max_sequence_length
    expected_keys = {
        "cogvideox": {"prompt_embeds"},
        "wan": {"prompt_embeds"},
        "hunyuanvideo": {"prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"},
        "ltx_video": {"prompt_embeds", "prompt_attention_mask"},
    }[family]
    assert set(out) == expected_keys
    embeds = out["prompt_embeds"]
    assert embeds.shape[:2] == (2, length)
    assert not torch.allclose(embeds[0], embeds[1])  # different prompts, different embeddings
    if family == "hunyuanvideo":
        ids = _ids(pipe.tokenizer_2, PROMPTS, 77)
        torch.testing.assert_close(out["pooled_prompt_embeds"], pipe.text_encoder_2(ids).pooler_output)
        assert out["prompt_attention_mask"].shape == (2, length)
        return
    ids = _ids(pipe.tokenizer, PROMPTS, length)
    mask = ids != pipe.tokenizer.pad_token_id
    if family == "wan":  # the real tokens' states, zeros after them
        states = pipe.text_encoder(ids, attention_mask=mask.long()).last_hidden_state
        expected = states * mask[..., None]
    else:
        expected = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(embeds, expected)
    if family == "ltx_video":
        assert torch.equal(out["prompt_attention_mask"], mask)


def test_cogvideox_text_length_comes_from_the_transformer(components) -> None:
    assert components["cogvideox"].max_sequence_length == 16  # max_text_seq_length of the tiny transformer
    assert components["wan"].max_sequence_length == 512


def test_student_grid_at_real_shapes(components) -> None:
    """CogVideoX-5B: 49 x 480 x 720 -> 13 latent frames of 60 x 90, patch 2 -> 30 x 45 tokens."""
    cog, ltx = get_family("cogvideox"), get_family("ltx_video")
    assert student_grid(cog, (1, 2, 2), 49, 480, 720) == (13, 30, 45)
    assert student_grid(ltx, (1, 1, 1), 161, 512, 768) == (21, 16, 24)
    assert student_grid(get_family("hunyuanvideo"), (1, 2, 2), 129, 720, 1280) == (33, 45, 80)
    assert components["ltx_video"].patch_sizes == (1, 1, 1)


def test_unknown_pipeline_is_reported(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "transformer": ["diffusers", "Nope"]})
    )
    with pytest.raises(ValueError, match="Nope"):
        pipeline_family(tmp_path)
