"""Teachers: tiny random towers saved to disk and loaded through the real loader, checked against the
raw transformers models run and sliced by hand; input size and clip targets on the student's grid."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from crepa.config import TeacherSection
from crepa.models.pipelines import student_grid
from crepa.models.registry import get_family
from crepa.teachers import Teacher, clip_teacher_grid, detect_teacher_kind, load_teacher, teacher_input_size
from crepa.teachers.size import CoarseTeacherGridWarning

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Normalisation constants written out here, independent of the package's.
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
SIGLIP = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
# kind -> (config class, model class, config kwargs, prefix tokens, normalisation, forward kwargs)
TOWERS = {
    "dinov2": ("Dinov2Config", "Dinov2Model", {"image_size": 56, "patch_size": 14}, 1, IMAGENET, {}),
    "dinov2_with_registers": (
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersModel",
        {"image_size": 56, "patch_size": 14, "num_register_tokens": 4},
        5,
        IMAGENET,
        {},
    ),
    "clip": (
        "CLIPVisionConfig",
        "CLIPVisionModel",
        {"image_size": 32, "patch_size": 8},
        1,
        CLIP,
        {"interpolate_pos_encoding": True},
    ),
    "siglip": (
        "SiglipVisionConfig",
        "SiglipVisionModel",
        {"image_size": 32, "patch_size": 8},
        0,
        SIGLIP,
        {"interpolate_pos_encoding": True},
    ),
}


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    dirs = {}
    for kind, (config_class, model_class, kwargs, *_) in TOWERS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**TINY, **kwargs)
        getattr(transformers, model_class)(config).save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def reference_grid(kind: str, directory: Path, frames: torch.Tensor) -> torch.Tensor:
    """The raw transformers model on hand-normalised frames, prefix tokens sliced off by hand."""
    _, model_class, kwargs, prefix, (mean, std), forward_kwargs = TOWERS[kind]
    model = getattr(transformers, model_class).from_pretrained(directory).eval()
    pixels = (frames - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model(pixel_values=pixels, **forward_kwargs).last_hidden_state
    patch = kwargs["patch_size"]
    rows, cols = frames.shape[2] // patch, frames.shape[3] // patch
    assert tokens.shape[1] == prefix + rows * cols
    return tokens[:, prefix:].reshape(frames.shape[0], frames.shape[2] // patch, frames.shape[3] // patch, -1)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_patch_tokens_only_on_non_square_frames(kind: str, tower_dirs: dict[str, Path]) -> None:
    """A 2x3 patch grid (not the square grid the position embeddings were trained on): the loader
    detects the kind from config.json, strips CLS / registers and normalises like the reference."""
    teacher = load_teacher(tower_dirs[kind])
    assert isinstance(teacher, Teacher)
    assert detect_teacher_kind(tower_dirs[kind]) == kind
    patch = TOWERS[kind][2]["patch_size"]
    assert (teacher.patch_size, teacher.dim) == (patch, 32)
    torch.manual_seed(1)
    frames = torch.rand(3, 3, 2 * patch, 3 * patch)
    grid = teacher(frames)
    assert grid.shape == (3, 2, 3, 32)
    torch.testing.assert_close(grid, reference_grid(kind, tower_dirs[kind], frames), atol=1e-5, rtol=1e-5)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training  # a teacher stays frozen in eval mode


def test_normalisation_is_applied(tower_dirs: dict[str, Path]) -> None:
    """Feeding the raw model unnormalised frames gives something else: the teacher does normalise."""
    teacher = load_teacher(tower_dirs["dinov2"])
    frames = torch.rand(2, 3, 28, 42)
    model = transformers.Dinov2Model.from_pretrained(tower_dirs["dinov2"]).eval()
    with torch.no_grad():
        unnormalised = model(pixel_values=frames).last_hidden_state[:, 1:].reshape(2, 2, 3, 32)
    assert not torch.allclose(teacher(frames), unnormalised, atol=1e-3)


def test_chunking_matches_one_batch(tower_dirs: dict[str, Path]) -> None:
    frames = torch.rand(7, 3, 28, 42)
    chunked = load_teacher(tower_dirs["dinov2_with_registers"], chunk_size=3)(frames)
    whole = load_teacher(tower_dirs["dinov2_with_registers"], chunk_size=100)(frames)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_teacher_rejects_sizes_off_the_patch_grid(tower_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        load_teacher(tower_dirs["dinov2"])(torch.rand(1, 3, 30, 42))


def test_kind_detection(tmp_path: Path) -> None:
    assert detect_teacher_kind("timm/vit_large_patch14_dinov2.lvd142m") == "timm"
    assert detect_teacher_kind("timm:vit_small_patch14_reg4_dinov2") == "timm"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not a supported teacher"):
        detect_teacher_kind(tmp_path)


def test_timm_dinov2_with_registers(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    name = "vit_small_patch14_reg4_dinov2"
    reference = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    from crepa.teachers import load_timm_teacher

    teacher = load_timm_teacher(f"timm:{name}", weights_file=weights)
    frames = torch.rand(2, 3, 28, 42)
    pixels = (frames - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = reference.forward_features(pixels)[:, 5:].reshape(2, 2, 3, -1)
    torch.testing.assert_close(teacher(frames), expected, atol=1e-5, rtol=1e-5)


def test_timm_missing_gives_install_hint() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'crepa\[timm\]'"):
            load_teacher("timm/vit_small_patch14_dinov2.lvd142m")
    else:
        pytest.skip("timm is installed")


def test_teacher_input_size() -> None:
    assert teacher_input_size((30, 45), 14) == (420, 630)  # CogVideoX 480x720: 60x90 latents, patch 2
    assert teacher_input_size((30, 45), 14, max_pixels=420 * 630) == (420, 630)
    # Budget one pixel short: the largest grid of aspect 2:3 below 30x45 is 28x42.
    with pytest.warns(CoarseTeacherGridWarning):
        assert teacher_input_size((30, 45), 14, max_pixels=420 * 630 - 1) == (28 * 14, 42 * 14)
        assert teacher_input_size((30, 45), 14, max_pixels=10 * 15 * 196) == (140, 210)
    assert teacher_input_size((15, 22), 14, multiple=2) == (420, 616)  # LTX-Video's coarse grid, doubled
    assert teacher_input_size((16, 16), 16) == (256, 256)
    # 31x45 has no smaller grid of the same aspect: nearest aspect within 300 tokens.
    with pytest.warns(CoarseTeacherGridWarning):
        rows, cols = (size // 14 for size in teacher_input_size((31, 45), 14, max_pixels=300 * 196))
    assert rows * cols <= 300 and abs(cols / rows - 45 / 31) < 0.05 and rows * cols > 250


# (family, patch (t, h, w), frames, height, width) -> the student's token grid, written out by hand
STUDENT_GRIDS = [
    ("cogvideox", (1, 2, 2), 49, 480, 720, (30, 45)),  # CogVideoX-5B
    ("wan", (1, 2, 2), 81, 480, 832, (30, 52)),  # Wan 2.1 480P
    ("hunyuanvideo", (1, 2, 2), 129, 544, 960, (34, 60)),
    ("hunyuanvideo", (1, 2, 2), 129, 720, 1280, (45, 80)),
    ("ltx_video", (1, 1, 1), 161, 512, 768, (16, 24)),
]


@pytest.mark.parametrize("family,patch,frames,height,width,expected", STUDENT_GRIDS)
def test_default_teacher_grid_is_the_student_grid(family, patch, frames, height, width, expected) -> None:
    """With the run file's default teacher settings, DINOv2/14 sees (14 H', 14 W') pixels: a patch per token."""
    grid = student_grid(get_family(family), patch, frames, height, width)[1:]
    assert grid == expected
    settings = TeacherSection()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coarse-grid warning with the defaults
        size = teacher_input_size(grid, 14, settings.max_pixels)
    assert size == (expected[0] * 14, expected[1] * 14)


def test_capped_teacher_grid_warns_with_both_grids_and_memory() -> None:
    """Wan 480x832 under the old 630x420 budget: 15x26 for a 30x52 student grid, and the warning says so."""
    with pytest.warns(CoarseTeacherGridWarning) as caught:
        size = teacher_input_size((30, 52), 14, max_pixels=630 * 420, teacher_dim=1536, chunk_size=16)
    assert size == (15 * 14, 26 * 14)
    message = str(caught[0].message)
    assert "15x26" in message and "30x52" in message and "420x728" in message
    # 1560 tokens, 1536-d, 24 heads, 16 frames: 16 * 4 * (6 * 1560 * 1536 + 24 * 1560**2) bytes = 4.3 GiB
    expected_gib = 16 * 4 * (6 * 1560 * 1536 + 24 * 1560 * 1560) / 2**30
    assert f"{expected_gib:.2g} GiB" in message and "4.3 GiB" in message
    assert f">= {420 * 728}" in message


class PatchMeans:
    """A plug-in teacher following the protocol: each patch's mean colour (D = 3)."""

    name, dim, patch_size = "patch-means", 3, 4

    def __init__(self) -> None:
        self.inputs: list[tuple[int, ...]] = []

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tuple(frames.shape))
        return F.avg_pool2d(frames, self.patch_size).permute(0, 2, 3, 1)


def test_clip_grid_keeps_rows_and_columns_apart() -> None:
    """A non-square clip (red = x, green = y, blue = time): the grid has the student's 4x6 aspect,
    each cell holds its own position, and latent frames average pixel frames 0 | 1-4 | 5-8."""
    frames_count, height, width = 9, 40, 60
    y = (torch.arange(height) + 0.5) / height
    x = (torch.arange(width) + 0.5) / width
    t = torch.arange(frames_count) / 10
    frames = torch.stack(
        [
            x.expand(frames_count, height, width),
            y[:, None].expand(frames_count, height, width),
            t[:, None, None].expand(frames_count, height, width),
        ],
        dim=1,
    )
    teacher = PatchMeans()
    grid = clip_teacher_grid(teacher, frames, (3, 4, 6), temporal_ratio=4, chunk_size=4)
    assert grid.shape == (3, 4, 6, 3)
    assert teacher.inputs == [(4, 3, 16, 24), (4, 3, 16, 24), (1, 3, 16, 24)]  # 4x6 patches of 4 px
    # Cell centres; the antialiased resize clamps at the borders, which moves edge cells by ~1e-3.
    cell_x = (torch.arange(6) + 0.5) / 6
    cell_y = (torch.arange(4) + 0.5) / 4
    torch.testing.assert_close(grid[..., 0], cell_x.expand(3, 4, 6), atol=2e-3, rtol=0)
    torch.testing.assert_close(grid[..., 1], cell_y[:, None].expand(3, 4, 6), atol=2e-3, rtol=0)
    torch.testing.assert_close(grid[:, 0, 0, 2], torch.tensor([0.0, 0.25, 0.65]), atol=1e-6, rtol=0)
    # Same through uint8 frames.
    grid_u8 = clip_teacher_grid(PatchMeans(), (frames * 255).round().to(torch.uint8), (3, 4, 6), 4)
    torch.testing.assert_close(grid_u8, grid, atol=3e-3, rtol=0)


@pytest.mark.parametrize(
    ("reduce", "kept"), [("first", [0, 1, 5]), ("last", [0, 4, 8]), ("center", [0, 3, 7])]
)
def test_one_frame_reductions_encode_only_the_frames_they_keep(reduce, kept) -> None:
    """r = 4, 9 frames (blue = frame index / 10): "first" keeps frames 0, 1, 5, "last" 0, 4, 8,
    "center" 0, 3, 7 (index r // 2 in each group); only those reach the teacher, one forward of 3."""
    frames = torch.rand(9, 3, 16, 24)
    frames[:, 2] = (torch.arange(9) / 10)[:, None, None]
    teacher = PatchMeans()
    grid = clip_teacher_grid(teacher, frames, (3, 4, 6), temporal_ratio=4, reduce=reduce)
    assert teacher.inputs == [(3, 3, 16, 24)]
    torch.testing.assert_close(grid[:, 0, 0, 2], torch.tensor(kept) / 10, atol=1e-6, rtol=0)
    every_frame = F.avg_pool2d(frames, 4).permute(0, 2, 3, 1)  # the naive path: encode all 9, then pick
    torch.testing.assert_close(grid, every_frame[kept], atol=1e-6, rtol=0)


def test_clip_grid_with_a_real_teacher_matches_a_hand_computation(tower_dirs: dict[str, Path]) -> None:
    """5 frames of a 3:2 clip, student grid (2, 2, 3), r = 4: DINOv2 sees 28x42 frames; latent frame
    0 is frame 0, latent frame 1 the mean of frames 1-4."""
    teacher = load_teacher(tower_dirs["dinov2_with_registers"], chunk_size=2)
    frames = torch.rand(5, 3, 60, 90)
    grid = clip_teacher_grid(teacher, frames, (2, 2, 3), temporal_ratio=4)
    resized = F.interpolate(frames, size=(28, 42), mode="bilinear", antialias=True, align_corners=False)
    per_frame = reference_grid("dinov2_with_registers", tower_dirs["dinov2_with_registers"], resized)
    expected = torch.stack([per_frame[0], per_frame[1:].mean(0)])
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=1e-5)
    # Fewer pixels than 2x3 patches: the teacher runs on a 1x2 grid, resampled to the student's 2x3.
    with pytest.warns(CoarseTeacherGridWarning, match="1x2 for the student's 2x3"):
        small = clip_teacher_grid(teacher, frames, (2, 2, 3), temporal_ratio=4, max_pixels=14 * 14 * 6 - 1)
    assert small.shape == (2, 2, 3, 32)
    with pytest.raises(ValueError, match="needs 9"):
        clip_teacher_grid(teacher, frames, (3, 2, 3), temporal_ratio=4)
