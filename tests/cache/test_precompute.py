"""``crepa precompute`` end to end on real files: mp4 clips written with PyAV, tiny pipelines saved
with ``save_pretrained``, a tiny DINOv2 saved and loaded through the real loaders, safetensors
shards on disk, and a real subprocess killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model
from typer.testing import CliRunner

from crepa.cache import CacheDamagedError, CachedDataset, Manifest, read_shard_index
from crepa.cli import app
from crepa.config import load_config
from crepa.data import VideoSample, load_sample
from crepa.io.video import probe_video, write_video
from crepa.models.pipelines import encode_latents, load_components
from crepa.models.registry import get_family
from crepa.models.tiny_pipelines import save_tiny_pipeline
from crepa.precompute import precompute
from crepa.teacher_targets import teacher_targets
from crepa.teachers import load_teacher
from helpers import start_cli

FAMILIES = ("cogvideox", "wan", "hunyuanvideo", "ltx_video")
SOURCE_FPS = 24


def moving_clip(num_frames: int, seed: int, height: int = 72, width: int = 112) -> np.ndarray:
    """Stripes moving right and down at a per-clip speed, on a per-clip background: (T, H, W, 3) uint8."""
    t = np.arange(num_frames)[:, None, None]
    y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    red = ((x + (seed + 1) * 3 * t) % 40 < 20) * 200
    green = ((y + 2 * t) % 30 < 15) * 180
    blue = np.full((num_frames, height, width), 40 * seed % 256)
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).astype(np.uint8)


def write_dataset(folder: Path, lengths: list[int], bad: bool = True) -> Path:
    """Clips of ``lengths`` frames at 24 fps with captions (two share a caption), plus bad inputs."""
    folder.mkdir(parents=True)
    captions = ["a red car drives on the road", "a dog runs on the beach", "a red car drives on the road"]
    for i, length in enumerate(lengths):
        write_video(folder / f"clip{i:02d}.mp4", moving_clip(length, i), fps=SOURCE_FPS)
        (folder / f"clip{i:02d}.txt").write_text(captions[i % len(captions)])
    if bad:
        (folder / "zero.mp4").write_bytes(b"")
        (folder / "zero.txt").write_text("a dog")
        write_video(folder / "uncaptioned.mp4", moving_clip(30, 9), fps=SOURCE_FPS)
    return folder


def write_run_file(
    path: Path, pipeline: Path, teacher: Path, data: Path, cache: Path, extra: str = ""
) -> Path:
    path.write_text(
        f"""
[model]
pretrained = "{pipeline}"
[data]
source = "{data}"
resolutions = [[64, 96]]
num_frames = [9, 17]
fps = 12
[cache]
dir = "{cache}"
shard_mb = 0.001
[teacher]
name = "{teacher}"
max_pixels = 20000
chunk_size = 4
{extra}
"""
    )
    return path


def save_tiny_dinov2(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=56,
        patch_size=14,
    )
    Dinov2Model(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("precompute")


@pytest.fixture(scope="module")
def teacher_dir(root: Path) -> Path:
    return save_tiny_dinov2(root / "dinov2", seed=0)


@pytest.fixture(scope="module")
def data_dir(root: Path) -> Path:
    return write_dataset(root / "data", [30, 60, 30])


def pipeline_dir(root: Path, family: str) -> Path:
    directory = root / "pipelines" / family
    if not directory.exists():
        save_tiny_pipeline(family, directory)
    return directory


def tensors_of(dataset: CachedDataset) -> list[dict[str, torch.Tensor]]:
    """Every item's tensors, copied (reads are memory-mapped views of the shard files)."""
    return [{k: v.clone() for k, v in dataset[i].items() if k != "index"} for i in range(len(dataset))]


@pytest.mark.parametrize("family", FAMILIES)
def test_precompute_tiny_pipeline(family: str, root: Path, teacher_dir: Path, data_dir: Path) -> None:
    pipeline = pipeline_dir(root, family)
    run = write_run_file(root / f"{family}.toml", pipeline, teacher_dir, data_dir, root / f"cache-{family}")
    summary = precompute(load_config(run), progress=False)

    entry = get_family(family)
    assert summary.samples == 3
    assert summary.computed == {"latents": 3, "text": 3, "teacher": 3}  # 2 captions + the empty prompt
    skipped = {Path(item.path).name: item.reason for item in summary.report.skipped}
    assert set(skipped) == {"zero.mp4", "uncaptioned.mp4"}
    assert "0 bytes" in skipped["zero.mp4"] and "caption" in skipped["uncaptioned.mp4"]

    dataset = CachedDataset(root / f"cache-{family}")
    manifest = dataset.manifest
    assert manifest.family == family and manifest.teacher["dim"] == 32
    # 30 frames at 24 fps resampled to 12 fps: every other frame; 60 frames supply the 17 bucket.
    assert dataset.entries[0].frame_indices == (0, 2, 4, 6, 8, 10, 12, 14, 16)
    assert dataset.buckets == [(9, 64, 96), (17, 64, 96), (9, 64, 96)]
    assert dataset.entries[0].parts["text"] == dataset.entries[2].parts["text"]

    components = load_components(pipeline)
    patch = components.patch_sizes
    for item, cached in zip(dataset.entries, tensors_of(dataset), strict=True):
        frames_count, height, width = item.bucket
        latent_frames = 1 + (frames_count - 1) // entry.temporal_ratio
        latent_size = (height // entry.spatial_ratio, width // entry.spatial_ratio)
        grid = (latent_frames, latent_size[0] // patch[1], latent_size[1] // patch[2])
        assert item.grid == grid
        assert cached["latents"].dtype == torch.float16
        assert cached["latents"].shape[1:] == (latent_frames, *latent_size)
        assert cached["teacher"].shape == (*grid, 32) and cached["teacher"].dtype == torch.float16
        assert cached["prompt_embeds"].shape[0] == components.max_sequence_length
        # The latents are those of the clean frames scaled to [-1, 1], in the VAE layout.
        frames = load_sample(
            VideoSample(Path(item.video), "", probe_video(item.video), item.frame_indices, item.size)
        )
        clip = frames.frames.permute(1, 0, 2, 3).unsqueeze(0) * 2 - 1
        torch.testing.assert_close(
            cached["latents"].float(), encode_latents(components.vae, clip)[0], atol=2e-3, rtol=2e-3
        )
    extra = {
        "hunyuanvideo": {"pooled_prompt_embeds", "prompt_attention_mask"},
        "ltx_video": {"prompt_attention_mask"},
    }
    assert set(dataset[0]) == {"index", "latents", "teacher", "prompt_embeds", *extra.get(family, set())}
    assert dataset.null_text()["prompt_embeds"].shape == dataset[0]["prompt_embeds"].shape


def hand_teacher_grid(teacher, frames: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """4x6 student tokens, patch 14 -> a 56x84 teacher input (the student's 2:3 aspect, no resampling);
    latent frame 0 is pixel frame 0, latent frame f >= 1 the mean over pixel frames 4f-3 .. 4f."""
    resized = F.interpolate(frames, size=(56, 84), mode="bilinear", antialias=True, align_corners=False)
    features = teacher(resized)
    assert features.shape[1:3] == (4, 6)
    return torch.stack(
        [features[0], *[features[4 * f - 3 : 4 * f + 1].mean(0) for f in range(1, latent_frames)]]
    )


def test_cached_teacher_equals_online_modes(root: Path, teacher_dir: Path, data_dir: Path) -> None:
    """Cache vs "pixels" (float16 tolerance), both vs teacher features computed by hand; "vae" vs a
    hand decode of the cached latents (Wan: latents * std + mean)."""
    pipeline = pipeline_dir(root, "wan")
    cache = root / "cache-modes"
    precompute(
        load_config(write_run_file(root / "modes.toml", pipeline, teacher_dir, data_dir, cache)),
        progress=False,
    )
    dataset = CachedDataset(cache, frames=True)
    teacher = load_teacher(teacher_dir)
    vae = load_components(pipeline, text_encoders=False).vae
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    for index in (0, 1):
        item = dataset[index]
        grid = dataset.entries[index].grid  # (3 or 5, 4, 6): non-square, 2:3
        batch = {key: value[None] for key, value in item.items() if key != "index"}
        cached = teacher_targets("cache", batch, grid, 4)[0].float()
        pixels = teacher_targets("pixels", batch, grid, 4, teacher=teacher, max_pixels=20000)[0]
        torch.testing.assert_close(cached, pixels, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(
            cached, hand_teacher_grid(teacher, item["frames"], grid[0]), atol=2e-3, rtol=2e-3
        )
        from_vae = teacher_targets("vae", batch, grid, 4, teacher=teacher, vae=vae, max_pixels=20000)[0]
        decoded = vae.decode((item["latents"].float() * std + mean)[None]).sample[0].clamp(-1, 1)
        expected = hand_teacher_grid(teacher, (decoded.transpose(0, 1) + 1) / 2, grid[0])
        torch.testing.assert_close(from_vae, expected, atol=1e-4, rtol=1e-4)


# ~65 s on 2 cores (a killed precompute subprocess, then two more): the slow suite
@pytest.mark.slow
def test_kill_and_resume_gives_the_same_store(root: Path, teacher_dir: Path) -> None:
    pipeline = pipeline_dir(root, "wan")
    data = write_dataset(root / "data-kill", [30] * 12, bad=False)
    killed_cache, reference_cache = root / "cache-killed", root / "cache-reference"
    run = write_run_file(root / "kill.toml", pipeline, teacher_dir, data, killed_cache)
    process = start_cli(
        "precompute", str(run), "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shards = killed_cache / "shards"
    deadline = time.monotonic() + 240
    while len(list(shards.glob("latents-*.safetensors"))) < 2:
        assert process.poll() is None, "precompute ended before it could be killed"
        assert time.monotonic() < deadline, "precompute made no progress"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(shards.glob("latents-*.safetensors")))
    assert not (killed_cache / "manifest.json").exists() and 2 <= written < 12

    resumed = precompute(load_config(run), progress=False)
    assert resumed.reused["latents"] == written and resumed.computed["latents"] == 12 - written
    precompute(load_config(run, [f'cache.dir="{reference_cache}"']), progress=False)

    killed, reference = Manifest.read(killed_cache), Manifest.read(reference_cache)
    assert killed.entries == reference.entries and killed.null_text == reference.null_text
    for a, b in zip(
        tensors_of(CachedDataset(killed_cache)), tensors_of(CachedDataset(reference_cache)), strict=True
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert not [path for path in shards.iterdir() if path.name.startswith(".tmp-")]


def test_damaged_shard_is_reported_and_recomputed(root: Path, teacher_dir: Path, data_dir: Path) -> None:
    cache = root / "cache-damage"
    run = write_run_file(root / "damage.toml", pipeline_dir(root, "wan"), teacher_dir, data_dir, cache)
    precompute(load_config(run), progress=False)
    before = tensors_of(CachedDataset(cache))
    shard = sorted((cache / "shards").glob("teacher-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data; the header still parses
    shard.write_bytes(bytes(data))
    damaged_key = read_shard_index(shard)[0].key
    damaged_item = next(
        i for i, e in enumerate(CachedDataset(cache).entries) if e.parts["teacher"] == damaged_key
    )
    with pytest.raises(CacheDamagedError, match="checksum"):
        CachedDataset(cache)[damaged_item]

    summary = precompute(load_config(run), progress=False)
    assert list(summary.damaged) == [shard.name] and "checksum" in summary.damaged[shard.name]
    assert summary.computed == {"latents": 0, "text": 0, "teacher": 1}
    assert not shard.exists()
    assert any(shard.name in line for line in summary.lines())
    after = tensors_of(CachedDataset(cache))
    assert all(torch.equal(a[key], b[key]) for a, b in zip(before, after, strict=True) for key in a)


def test_changing_the_teacher_recomputes_only_teacher_parts(
    root: Path, teacher_dir: Path, data_dir: Path
) -> None:
    cache = root / "cache-teacher"
    pipeline = pipeline_dir(root, "wan")
    precompute(
        load_config(write_run_file(root / "t1.toml", pipeline, teacher_dir, data_dir, cache)), progress=False
    )
    latents_before = [item["latents"] for item in tensors_of(CachedDataset(cache))]
    other = save_tiny_dinov2(root / "dinov2-other", seed=1)
    run = write_run_file(root / "t2.toml", pipeline, other, data_dir, cache)
    summary = precompute(load_config(run), progress=False)
    assert summary.computed == {"latents": 0, "text": 0, "teacher": 3}
    assert summary.reused == {"latents": 3, "text": 3, "teacher": 0}  # 2 captions + the empty prompt
    stale = summary.stale_shards
    assert stale and all(name.startswith("teacher-") for name in stale)
    assert all((cache / "shards" / name).exists() for name in stale)
    dataset = CachedDataset(cache)
    assert dataset.manifest.teacher["name"] == str(other)
    assert all(torch.equal(a, b["latents"]) for a, b in zip(latents_before, tensors_of(dataset), strict=True))
    pruned = precompute(load_config(run), prune=True, progress=False)
    assert pruned.computed == {"latents": 0, "text": 0, "teacher": 0}
    assert not any((cache / "shards" / name).exists() for name in stale)
    assert len(CachedDataset(cache)) == 3


def test_tiled_vae_recomputes_only_latents(root: Path, teacher_dir: Path, data_dir: Path) -> None:
    cache = root / "cache-tiling"
    run = write_run_file(root / "tiling.toml", pipeline_dir(root, "wan"), teacher_dir, data_dir, cache)
    precompute(load_config(run), progress=False)
    summary = precompute(load_config(run, ["cache.vae_tiling=true"]), progress=False)
    assert summary.computed == {"latents": 3, "text": 0, "teacher": 0}
    assert summary.reused == {"latents": 0, "text": 3, "teacher": 3}  # 2 captions + the empty prompt


def test_counts_name_one_unit_on_the_first_run_and_the_rerun(
    root: Path, teacher_dir: Path, data_dir: Path
) -> None:
    """3 clips, two of them with the same caption: the bar counts the 3 clips (not the empty prompt);
    the texts are the 2 captions and the empty prompt, computed by the first run, reused by the rerun
    (which shows no bar: nothing is left to compute)."""
    run = write_run_file(
        root / "counts.toml", pipeline_dir(root, "wan"), teacher_dir, data_dir, root / "cache-counts"
    )
    outputs = []
    for _ in range(2):
        result = CliRunner().invoke(app, ["precompute", str(run)])
        outputs.append(" ".join((result.stdout + (result.stderr or "")).split()))
        assert result.exit_code == 0, outputs[-1]
    first, rerun = outputs
    assert "3/3 clips" in first
    assert "computed: latents 3, text 3, teacher 3; reused: latents 0, text 0, teacher 0" in first
    assert "computed: latents 0, text 0, teacher 0; reused: latents 3, text 3, teacher 3" in rerun
    assert rerun.startswith("cache ")  # the summary comes first: no bar when no clip has work left


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("data.fsp=12", "data.fsp"),
        ("data.num_frames=[10]", "data.num_frames"),
        ("data.resolutions=[[60, 90]]", "data.resolutions"),
        ('model.pretrained="/nowhere/at/all"', "model.pretrained"),
        ('teacher.name="/nowhere/at/all"', "teacher.name"),
    ],
)
def test_config_errors_exit_2_naming_the_key(
    setting: str, key: str, root: Path, teacher_dir: Path, data_dir: Path
) -> None:
    run = write_run_file(
        root / "errors.toml", pipeline_dir(root, "wan"), teacher_dir, data_dir, root / "cache-x"
    )
    result = CliRunner().invoke(app, ["precompute", str(run), "--set", setting])
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output


def test_no_usable_clip_is_an_error(root: Path, teacher_dir: Path) -> None:
    """Only unusable inputs (an empty file, a clip shorter than every frame bucket): exit 2 before any model."""
    data = root / "unusable"
    data.mkdir()
    (data / "empty.mp4").write_bytes(b"")
    (data / "empty.txt").write_text("a dog")
    write_video(data / "short.mp4", moving_clip(4, 0), fps=SOURCE_FPS)
    (data / "short.txt").write_text("a cat")
    run = write_run_file(
        root / "unusable.toml", pipeline_dir(root, "wan"), teacher_dir, data, root / "cache-u"
    )
    result = CliRunner().invoke(app, ["precompute", str(run), "--no-progress"])
    output = " ".join((result.stdout + (result.stderr or "")).split())
    assert result.exit_code == 2, output
    assert "data.source: no usable clip" in output and "Traceback" not in output
    assert not (root / "cache-u/manifest.json").exists()


@pytest.mark.slow
def test_two_processes_write_one_manifest_equal_to_one_process(
    root: Path, teacher_dir: Path, data_dir: Path
) -> None:
    pipeline = pipeline_dir(root, "wan")
    run = write_run_file(root / "ddp.toml", pipeline, teacher_dir, data_dir, root / "cache-ddp")
    # Without CUDA, --multi_gpu starts torchrun ranks that form a gloo group.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["-m", "crepa", "precompute", str(run), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    precompute(load_config(run, [f'cache.dir="{root / "cache-single"}"']), progress=False)
    two, one = Manifest.read(root / "cache-ddp"), Manifest.read(root / "cache-single")
    assert two.entries == one.entries
    shards = {location.shard for location in two.parts.values()}
    assert any("-r1-" in name for name in shards) and any("-r0-" in name for name in shards)
    two_items, one_items = (
        tensors_of(CachedDataset(root / "cache-ddp")),
        tensors_of(CachedDataset(root / "cache-single")),
    )
    for a, b in zip(two_items, one_items, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
