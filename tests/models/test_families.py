"""The support matrix, end to end: every trainable variant not covered by test_train runs precompute ->
train (CREPA) -> its LoRA loads into the family's diffusers pipeline -> a validation clip; image-to-video
inputs equal the ones the diffusers pipelines build; every unsupported variant stops at config time."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from crepa.cache.dataset import CachedDataset
from crepa.cli import app
from crepa.config import ConfigError, load_config
from crepa.models.conditioning import transformer_inputs
from crepa.models.image_conditioning import IMAGE_ENCODERS
from crepa.models.pipelines import load_components
from crepa.models.registry import FAMILIES, get_family
from crepa.models.support import VARIANTS, support_markdown, support_rows
from crepa.models.tiny import TINY_MODELS
from crepa.models.tiny_pipelines import TINY_PIPELINES, save_tiny_pipeline
from crepa.precompute import precompute
from crepa.train.recipe import train
from helpers import FAMILY_RUN, IMAGE_TO_VIDEO, REPO, SHAPES, TRAIN_FAMILIES

README = REPO / "README.md"
# the tiny pipelines train/test_train.py does not train end to end
FAMILY_SHAPES = {name: shape for name, shape in SHAPES.items() if name not in TRAIN_FAMILIES}
# ~30 s each on 2 cores: the slow suite
SLOW = {"cogvideox_1_5", "wan_a14b", "skyreels_v2", "mochi", "wan2_2_ti2v", "wan_i2v_a14b"}


def test_every_trainable_variant_has_an_end_to_end_test() -> None:
    tested = set(SHAPES)
    for variant in VARIANTS:
        assert variant.family in FAMILIES
        if variant.tiny is not None:
            assert variant.trainable and variant.tiny in TINY_PIPELINES and variant.tiny in tested, variant
    assert {variant.family for variant in VARIANTS} == set(FAMILIES)  # every family is in the matrix
    rows = {row.variant: row.trainable for row in support_rows()}
    assert rows["CogVideoX-5B-I2V"] == rows["Wan2.1-I2V-14B-480P / 720P"] == "yes"


def test_readme_shows_the_generated_support_matrix() -> None:
    assert support_markdown() in README.read_text()
    result = CliRunner().invoke(app, ["families", "--markdown"])
    assert result.exit_code == 0 and result.output.strip() == support_markdown()


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in FAMILY_SHAPES]
)
def test_precompute_train_load_lora_and_validate(tmp_path: Path, name: str, tiny_world) -> None:
    run = tiny_world(name, **FAMILY_RUN)
    precompute(load_config(run), progress=False)
    summary = train(load_config(run), progress=False)
    assert summary.steps == 2 and summary.skipped_nonfinite == 0
    assert np.isfinite(summary.final_metrics["loss/total"]) and summary.final_metrics["crepa/weight"] == 0.5
    index = json.loads((tmp_path / "pipe/model_index.json").read_text())
    pipeline = getattr(diffusers, index["_class_name"]).from_pretrained(tmp_path / "pipe")
    expert = load_config(run).model.expert
    pipeline.load_lora_weights(tmp_path / "out", load_into_transformer_2=expert == "transformer_2")
    saved = load_file(tmp_path / "out/pytorch_lora_weights.safetensors")
    trained_module = getattr(pipeline, expert or "transformer")
    loaded = {name.replace(".default_0", ""): param for name, param in trained_module.named_parameters()}
    trained_b = {key.removeprefix("transformer."): value for key, value in saved.items() if "lora_B" in key}
    assert trained_b and all(value.abs().sum() > 0 for value in trained_b.values())  # lora_B starts at 0
    for key, value in trained_b.items():  # (Wan I2V's loader adds zero LoRAs on the image projections)
        torch.testing.assert_close(loaded[key].detach(), value)
    record = json.loads((tmp_path / "out/validation/step-000002/samples.jsonl").read_text().splitlines()[0])
    assert (tmp_path / "out/validation/step-000002" / record["file"]).stat().st_size > 0
    if name in IMAGE_TO_VIDEO:
        assert Path(record["image"]).name == "first.png"


def _sample_is_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CogVideoX I2V pipeline samples the image posterior; crepa caches its mode. Make them meet."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


@pytest.mark.parametrize("name", ["cogvideox_i2v", "wan_i2v"])
def test_image_conditioning_is_what_the_pipeline_feeds(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached image parts + noisy latents -> transformer kwargs equal to the diffusers pipeline's own
    ``prepare_latents`` (+ ``encode_image``) output joined as its denoising loop joins it."""
    _sample_is_mode(monkeypatch)
    save_tiny_pipeline(name, tmp_path / "pipe")
    components = load_components(tmp_path / "pipe")
    family = components.family
    pipeline = getattr(diffusers, family.pipeline_class).from_pretrained(tmp_path / "pipe")
    transformer = pipeline.transformer
    torch.manual_seed(3)
    frames = torch.rand(9, 3, 32, 32)
    parts = {key: value[None] for key, value in IMAGE_ENCODERS[family.name](components, frames).items()}
    noisy = torch.randn(1, 16, 3, 4, 4)
    text = {"prompt_embeds": torch.randn(1, 16, 32)}
    inputs = transformer_inputs(transformer, family, noisy, torch.tensor([500.0]), text, image=parts)
    image = frames[:1] * 2 - 1  # (1, 3, H, W): what the pipeline's video processor gives
    generator = torch.Generator().manual_seed(0)
    if name == "cogvideox_i2v":
        _, image_latents = pipeline.prepare_latents(
            image, 1, 16, 9, 32, 32, torch.float32, torch.device("cpu"), generator
        )
        expected = torch.cat([noisy.transpose(1, 2), image_latents], dim=2)  # (B, F, 2C, h, w)
        torch.testing.assert_close(inputs["hidden_states"], expected, atol=1e-5, rtol=1e-5)
        return
    _, condition = pipeline.prepare_latents(
        image, 1, 16, 32, 32, 9, torch.float32, torch.device("cpu"), generator
    )
    torch.testing.assert_close(
        inputs["hidden_states"], torch.cat([noisy, condition], dim=1), atol=1e-5, rtol=1e-5
    )
    first = Image.fromarray((frames[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    torch.testing.assert_close(
        inputs["encoder_hidden_states_image"],
        pipeline.encode_image(first, torch.device("cpu")),
        atol=1e-5,
        rtol=1e-5,
    )


def test_cache_holds_the_image_conditioning(tmp_path: Path, tiny_world) -> None:
    run = tiny_world("wan_i2v", **FAMILY_RUN)
    precompute(load_config(run, ["crepa.enabled=false"]), progress=False)
    item = CachedDataset(tmp_path / "cache")[0]
    assert item["latents"].shape == (16, 3, 4, 4) and item["condition_latents"].shape == (16, 3, 4, 4)
    assert item["image_embeds"].shape == (17, 32)  # CLIP: 1 + (32 / 8)^2 tokens of the tiny tower


def test_cogvideox_1_5_odd_latent_frames_are_refused_with_a_suggestion(tiny_world) -> None:
    run = tiny_world("cogvideox_1_5", **FAMILY_RUN)
    config = load_config(run, ["data.num_frames=[81]"])
    with pytest.raises(ConfigError, match=r"81 frames give 21 latent frames.*use 77 or 85"):
        precompute(config, progress=False)
    with pytest.raises(ConfigError, match="use 77 or 85"):
        train(config, progress=False)


# unsupported variant -> (tiny transformer config, config changes): what its model_index / config say
UNSUPPORTED_CONFIGS = {
    "hunyuanvideo": ("hunyuanvideo", {}),
    "wan": ("wan", {}),
    "wan_i2v": ("wan", {"in_channels": 36, "out_channels": 16}),
    "ltx_video": ("ltx_video", {}),
    "cosmos": ("cosmos", {}),
    "cosmos_predict2": ("cosmos_predict2", {}),
    "allegro": ("allegro", {}),
}
UNSUPPORTED = [variant for variant in VARIANTS if not variant.trainable]


def write_config_only_pipeline(root: Path, variant) -> Path:
    """model_index.json + transformer/config.json of ``variant``, no weights (nothing may load them)."""
    tiny, changes = UNSUPPORTED_CONFIGS[variant.family]
    family = get_family(variant.family)
    transformer_class = getattr(diffusers, family.class_names[0])
    with torch.device("meta"):
        transformer = transformer_class(**{**TINY_MODELS[tiny].config, **changes})
    transformer.save_config(root / "pipe" / "transformer")
    index = {"_class_name": variant.pipeline_class, "transformer": ["diffusers", family.class_names[0]]}
    if variant.expert_pair:
        index |= {"transformer_2": ["diffusers", family.class_names[0]], "boundary_ratio": 0.875}
    (root / "pipe" / "model_index.json").write_text(json.dumps(index))
    (root / "clips").mkdir()
    run = root / "run.toml"
    run.write_text(
        '[model]\npretrained = "pipe"\n[data]\nsource = "clips"\nnum_frames = [9]\nresolutions = [[64, 64]]\n'
    )
    return run


@pytest.mark.parametrize("variant", UNSUPPORTED, ids=[variant.name for variant in UNSUPPORTED])
@pytest.mark.parametrize("command", ["precompute", "train"])
def test_unsupported_variant_fails_at_config_time(tmp_path: Path, variant, command: str) -> None:
    run = write_config_only_pipeline(tmp_path, variant)
    result = CliRunner().invoke(app, [command, str(run)])
    assert result.exit_code == 2, result.output
    assert variant.unsupported.split(":")[0][:40] in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_image_to_video_example_has_the_paper_settings() -> None:
    config = load_config(README.parent / "examples/cogvideox_5b_i2v.toml")
    crepa = config.crepa
    assert (crepa.mode, crepa.block_index, crepa.weight, crepa.distance, crepa.tau) == (
        "crepa",
        8,
        0.5,
        1,
        1.0,
    )
    assert (
        config.model.pretrained == "THUDM/CogVideoX-5b-I2V" and config.teacher.name == "facebook/dinov2-giant"
    )
    assert len(config.validation.images) == len(config.validation.prompts) == 1


def test_lora_of_a_pipeline_without_a_lora_loader_is_saved_in_peft_and_diffusers_form(tmp_path: Path) -> None:
    """AllegroPipeline has no save_lora_weights: the fallback file + adapter_config.json rebuild the same
    adapted transformer in a fresh model through peft alone."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    from crepa.config import LoraSection
    from crepa.models.tiny import tiny_inputs, tiny_transformer
    from crepa.train.lora import ADAPTER_CONFIG, LORA_FILE, add_lora, save_lora

    family = get_family("allegro")
    assert not hasattr(getattr(diffusers, family.pipeline_class), "save_lora_weights")
    trained = tiny_transformer("allegro")
    add_lora(trained, family, LoraSection(rank=2, alpha=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    path = save_lora(trained, family, tmp_path)
    assert path == tmp_path / LORA_FILE
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["lora_alpha"] == 4
    assert keys and all(key.startswith("transformer.") for key in keys)
    fresh = tiny_transformer("allegro")
    settings = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    inject_adapter_in_model(
        LoraConfig(**{k: settings[k] for k in ("r", "lora_alpha", "target_modules")}), fresh
    )
    state = load_file(path)
    result = set_peft_model_state_dict(
        fresh, {key.removeprefix("transformer."): value for key, value in state.items()}
    )
    assert not [key for key in result.unexpected_keys if "lora" in key]
    inputs = tiny_inputs("allegro", trained, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs)[0], trained(**inputs)[0])
        base = tiny_transformer("allegro")(**inputs)[0]
    assert not torch.allclose(base, trained(**inputs)[0])  # the LoRA changes the output


def test_two_expert_pipeline_needs_an_expert_and_each_trains_on_its_noise_range(
    tmp_path: Path, tiny_world
) -> None:
    """Wan 2.2 A14B: without model.expert the run stops at config time; with it, flow-matching noise
    levels are mapped into the expert's side of boundary_ratio = 0.875 (timestep 875 of 1000)."""
    from crepa.models.pipelines import expert_noise_range
    from crepa.train.step import noise_batch

    run = tiny_world("wan_a14b", **FAMILY_RUN)
    text = run.read_text().replace('expert = "transformer_2"', "")
    run.write_text(text)
    result = CliRunner().invoke(app, ["precompute", str(run)])
    assert result.exit_code == 2 and "model.expert" in result.output and "Traceback" not in result.output
    pipe = tmp_path / "pipe"
    assert expert_noise_range(pipe, "transformer") == (0.875, 1.0)
    assert expert_noise_range(pipe, "transformer_2") == (0.0, 0.875)
    assert expert_noise_range(pipe, None) == (0.0, 1.0)
    config = load_config(run, ['train.timestep_sampling="uniform"'])
    latents = torch.zeros(4096, 1, 1, 1, 1)
    for expert, (low, high) in (("transformer", (875, 1000)), ("transformer_2", (0, 875))):
        generator = torch.Generator().manual_seed(0)
        noised = noise_batch(
            config, get_family("wan"), latents, generator, None, expert_noise_range(pipe, expert)
        )
        timesteps = noised.timesteps
        assert timesteps.min() >= low and timesteps.max() <= high
        assert timesteps.min() < low + 5 and timesteps.max() > high - 5  # the whole range is used


def test_image_to_video_validation_without_images_fails_at_config_time(tiny_world) -> None:
    run = tiny_world("cogvideox_i2v", **FAMILY_RUN)
    run.write_text(run.read_text().replace('images = ["first.png"]', ""))
    result = CliRunner().invoke(app, ["train", str(run)])
    assert result.exit_code == 2 and "validation.images" in result.output and "Traceback" not in result.output
