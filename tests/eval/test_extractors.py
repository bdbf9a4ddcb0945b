"""Extractors loaded from tiny saved checkpoints, and the VBench formula through the real pipeline."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crepa.eval import extractors
from crepa.eval.evaluate import StageTimer, check_extractors, evaluate_clip
from crepa.eval.extractors import CallableExtractor, TeacherExtractor, load_extractor
from crepa.eval.names import EXTRACTOR_KINDS
from crepa.eval.tiny import save_tiny_extractors
from crepa.teachers import load_teacher
from helpers import textured_image, translating_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_extractors(tmp_path_factory.mktemp("extractors"))


def run_metrics(frames: np.ndarray, extractors: dict, metrics: tuple[str, ...]) -> dict[str, float]:
    values, _ = evaluate_clip(frames, 8.0, metrics, extractors, "dis", StageTimer())
    return values


def test_subject_consistency_equals_a_hand_written_vbench_computation(tiny):
    from transformers import ViTModel

    clip = translating_clip(6, 40, 56, shift=(3, 1))
    values = run_metrics(
        clip, {"subject_consistency": load_extractor(f"dino:{tiny['dino']}")}, ("subject_consistency",)
    )

    # VBench: Resize(224) of the short side (bilinear, no antialias), no crop, /255, ImageNet
    # normalisation, DINO CLS feature, then its running loop over frames.
    model = ViTModel.from_pretrained(tiny["dino"], add_pooling_layer=False).eval()
    pixels = torch.from_numpy(clip).permute(0, 3, 1, 2).float()
    pixels = F.interpolate(pixels, size=(224, int(224 * 56 / 40)), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (pixels / 255.0 - mean) / std
    with torch.no_grad():  # one frame per forward, as VBench does
        features = [
            F.normalize(
                model(pixel_values=pixels[i : i + 1], interpolate_pos_encoding=True).last_hidden_state[:, 0],
                dim=-1,
                p=2,
            )
            for i in range(len(clip))
        ]
    video_sim = 0.0
    for t in range(1, len(clip)):
        to_previous = max(0.0, F.cosine_similarity(features[t - 1], features[t]).item())
        to_first = max(0.0, F.cosine_similarity(features[0], features[t]).item())
        video_sim += (to_previous + to_first) / 2
    expected = video_sim / (len(clip) - 1)
    assert expected < 0.99999  # the clip moves: the check is not the trivial value 1
    assert values["subject_consistency"] == pytest.approx(expected, rel=1e-5)


def test_identical_frames_give_subject_and_background_consistency_of_one(tiny):
    frames = np.repeat(textured_image(48, 64)[None], 5, axis=0)
    extractors = {
        "subject_consistency": load_extractor(f"dino:{tiny['dino']}"),
        "background_consistency": load_extractor(f"clip:{tiny['clip']}"),
    }
    values = run_metrics(
        frames, extractors, ("subject_consistency", "background_consistency", "temporal_flickering")
    )
    assert values["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert values["background_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert values["temporal_flickering"] == 1.0


@pytest.mark.parametrize(
    ("kind", "level", "width"), [("clip", "frame", 24), ("dinov2", "frame", 32), ("videomae", "clip", 32)]
)
def test_loaded_extractors_give_one_feature_per_frame_or_clip(tiny, kind, level, width):
    extractor = load_extractor(f"{kind}:{tiny[kind]}", batch_size=2)
    frames = translating_clip(5, 40, 56, shift=(2, 0))
    features = extractor(frames)
    assert extractor.level == level and str(tiny[kind]) in extractor.name
    assert tuple(features.shape) == ((5, width) if level == "frame" else (width,))
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_clip_extractor_equals_the_projected_image_embedding_of_the_full_model(tiny):
    from transformers import CLIPModel

    frames = translating_clip(2, 32, 32, shift=(1, 0))
    features = load_extractor(f"clip:{tiny['clip']}")(frames)
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    pixels = F.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic"
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=(pixels / 255 - mean) / std, interpolate_pos_encoding=True)
        expected = model.visual_projection(vision.pooler_output)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_teacher_extractor_averages_the_patch_grid(tiny):
    teacher = load_teacher(tiny["dinov2"])
    extractor = load_extractor(f"teacher:{tiny['dinov2']}")
    assert isinstance(extractor, TeacherExtractor) and extractor.teacher.patch_size == 14
    frames = np.repeat(textured_image(30, 30)[None], 2, axis=0)
    features = extractor(frames)
    pixels = F.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bilinear"
    )
    torch.testing.assert_close(features, teacher(pixels / 255).mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)


def test_callable_extractors_pool_patch_grids_and_check_shapes():
    grid = CallableExtractor(lambda frames: frames.float().view(len(frames), 2, 2, 3), name="grid")
    frames = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    torch.testing.assert_close(grid(frames), torch.from_numpy(frames).float().mean(dim=(1, 2)))
    wrong = CallableExtractor(lambda frames: torch.zeros(3, 4), name="wrong")
    with pytest.raises(ValueError, match="wrong: expected"):
        wrong(frames)


def test_py_spec_imports_a_factory(tmp_path, monkeypatch):
    module = tmp_path / "my_extractor_module.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch

            def build():
                return lambda frames: frames.float().mean(dim=(1, 2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    extractor = load_extractor("py:my_extractor_module:build")
    assert extractor.name == "py:my_extractor_module:build"
    frames = np.full((3, 4, 4, 3), 7, dtype=np.uint8)
    torch.testing.assert_close(extractor(frames), torch.full((3, 3), 7.0))
    sys.modules.pop("my_extractor_module", None)


def test_bad_specs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown extractor 'resnet'"):
        load_extractor("resnet")
    with pytest.raises(ValueError, match="no default weights"):
        load_extractor("videomae")
    with pytest.raises(ValueError, match="not a directory"):
        load_extractor(f"dino:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match=r"py:package\.module:factory"):
        load_extractor("py:only_a_module")
    with pytest.raises(ValueError, match="cannot import"):
        load_extractor("py:no_such_module_here:build")


def test_the_extractor_kinds_the_cli_lists_are_the_ones_built():
    """crepa.eval.names lists the kinds without importing torch; each but "py" has a builder."""
    assert set(extractors._BUILDERS) == set(EXTRACTOR_KINDS) - {"py"}


def test_clip_level_extractor_is_refused_for_consistency(tiny):
    video_model = load_extractor(f"videomae:{tiny['videomae']}")
    with pytest.raises(ValueError, match="one feature per clip"):
        check_extractors(("subject_consistency",), {"subject_consistency": video_model})
    check_extractors(("frechet_distance",), {"frechet_distance": video_model})


def test_clip_extractor_also_loads_a_vision_only_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=16,
    )
    config.projection_dim = 12
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "vision")
    features = load_extractor(f"clip:{tmp_path / 'vision'}")(translating_clip(3, 32, 40, shift=(1, 0)))
    assert tuple(features.shape) == (3, 12)
