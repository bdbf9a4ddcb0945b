"""Precompute throughput per stage on CPU, and the cache size per sample at CogVideoX-5B's real shapes.

Stages (clips per second, median of ``--repeats`` timed runs after one warm-up):
  decode   probe + decode + resize/centre-crop of an H.264 clip at the real size: 49 of 64 frames
           (16 fps) at 480x720 (a model-independent cost);
  vae      crepa.models.pipelines.encode_latents with the tiny saved VAEs (17 frames, 64x96);
  text     crepa.models.pipelines.encode_prompts with the tiny saved text encoders (one caption);
  teacher  crepa.teachers.clip_teacher_grid with a tiny DINOv2 (hidden 32, 2 layers) on the same
           17 x 64x96 clip, grid matched to the Wan student grid (5 x 4 x 6).

Cache size per sample is computed from the shapes (float16) for CogVideoX-5B, 49 frames at 480x720:
latents 16 x 13 x 60 x 90, T5-XXL embeddings 226 x 4096, DINOv2-S/B/L/g features on the matched
30 x 45 grid for 13 latent frames; then one sample of each part is written as a shard to check the
format's overhead.

    python benchmarks/bench_precompute.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from crepa.cache import ShardWriter
from crepa.data import SamplingConfig, load_sample, scan_dataset
from crepa.io.video import write_video
from crepa.models.pipelines import encode_latents, encode_prompts, load_components
from crepa.models.tiny_pipelines import save_tiny_pipeline
from crepa.teachers import clip_teacher_grid, load_teacher

FAMILIES = ("cogvideox", "wan", "hunyuanvideo", "ltx_video")
DINOV2_DIMS = {"DINOv2-S/14": 384, "DINOv2-B/14": 768, "DINOv2-L/14": 1024, "DINOv2-g/14": 1536}
COGVIDEOX_5B = {"frames": 49, "latent_frames": 13, "latent": (60, 90), "channels": 16, "text": (226, 4096)}
MIB = 2**20


def clips_per_second(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def moving_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    t = np.arange(num_frames)[:, None, None]
    y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    channels = np.broadcast_arrays(
        ((x + 5 * t) % 64 < 32) * 200, ((y + 3 * t) % 48 < 24) * 180, (x + y) % 256
    )
    return np.stack(channels, axis=-1).astype(np.uint8)


def stage_rates(root: Path, repeats: int) -> list[tuple[str, str, float]]:
    rows = []
    source = root / "data"
    source.mkdir()
    write_video(source / "clip.mp4", moving_frames(64, 480, 720), fps=16)
    (source / "clip.txt").write_text("a red car drives on the road")
    samples, _ = scan_dataset(source, SamplingConfig(frame_buckets=(49,), resolution_buckets=((480, 720),)))
    rows.append(
        (
            "decode",
            "PyAV, 49 frames 480x720 (real size)",
            clips_per_second(lambda: load_sample(samples[0]), repeats),
        )
    )

    torch.manual_seed(0)
    clip = torch.rand(1, 3, 17, 64, 96) * 2 - 1
    for family in FAMILIES:
        components = load_components(save_tiny_pipeline(family, root / family))
        rate = clips_per_second(lambda c=components: encode_latents(c.vae, clip), repeats)
        rows.append(("vae", f"tiny {type(components.vae).__name__}, 17x64x96", rate))
        rate = clips_per_second(
            lambda c=components: encode_prompts(c, ["a red car drives on the road"]), repeats
        )
        rows.append(("text", f"tiny {family} text encoder(s), {components.max_sequence_length} tokens", rate))

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, patch_size=14
    )
    Dinov2Model(config).save_pretrained(root / "dinov2")
    teacher = load_teacher(root / "dinov2")
    frames = (clip[0].transpose(0, 1) + 1) / 2  # (T, 3, H, W) in [0, 1]
    rate = clips_per_second(lambda: clip_teacher_grid(teacher, frames, (5, 4, 6), 4), repeats)
    rows.append(("teacher", "tiny DINOv2 (32-d, 2 layers), 17 frames at 56x84", rate))
    return rows


def cache_sizes() -> list[tuple[str, int]]:
    """(part, bytes) per sample at CogVideoX-5B's shapes in float16, from the shapes."""
    shape = COGVIDEOX_5B
    tokens = shape["latent_frames"] * (shape["latent"][0] // 2) * (shape["latent"][1] // 2)
    rows = [
        (
            "latents 16x13x60x90",
            shape["channels"] * shape["latent_frames"] * shape["latent"][0] * shape["latent"][1] * 2,
        ),
        ("T5-XXL embeddings 226x4096", shape["text"][0] * shape["text"][1] * 2),
    ]
    rows += [(f"{name} grid 13x30x45x{dim}", tokens * dim * 2) for name, dim in DINOV2_DIMS.items()]
    return rows


def measured_shard_bytes(root: Path) -> dict[str, int]:
    """Write one CogVideoX-5B-sized sample (with DINOv2-g) as shards; file sizes per kind."""
    writer = ShardWriter(root / "shards", "bench", max_bytes=1 << 40)
    shape = COGVIDEOX_5B
    writer.add("latents", "a", {"latents": torch.zeros(16, 13, *shape["latent"], dtype=torch.float16)})
    writer.add("text", "b", {"prompt_embeds": torch.zeros(*shape["text"], dtype=torch.float16)})
    writer.add("teacher", "c", {"teacher": torch.zeros(13, 30, 45, 1536, dtype=torch.float16)})
    writer.flush()
    return {path.name.split("-")[0]: path.stat().st_size for path in (root / "shards").iterdir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
        print("| stage | what | clips/s |\n|---|---|---|")
        for stage, what, rate in stage_rates(root, args.repeats):
            print(f"| {stage} | {what} | {rate:.2f} |")
        sizes = cache_sizes()
        print("\nCogVideoX-5B, 49 frames 480x720, float16, per sample:\n")
        print("| part | MiB |\n|---|---|")
        for part, size in sizes:
            print(f"| {part} | {size / MIB:.2f} |")
        base = sizes[0][1] + sizes[1][1]
        print(
            "\n| teacher | latents + text + teacher MiB | GiB per 1000 clips | teacher per pixel frame instead (49 frames) MiB |"
        )
        print("|---|---|---|---|")
        tokens_per_frame = (COGVIDEOX_5B["latent"][0] // 2) * (COGVIDEOX_5B["latent"][1] // 2)
        for (part, size), dim in zip(sizes[2:], DINOV2_DIMS.values(), strict=True):
            per_pixel_frame = tokens_per_frame * COGVIDEOX_5B["frames"] * dim * 2
            print(
                f"| {part.split()[0]} | {(base + size) / MIB:.2f} | {(base + size) * 1000 / 2**30:.1f} | {per_pixel_frame / MIB:.2f} |"
            )
        measured = measured_shard_bytes(root)
        computed = {"latents": sizes[0][1], "text": sizes[1][1], "teacher": sizes[-1][1]}
        print("\nOne sample written as shards (DINOv2-g): file bytes vs tensor bytes")
        for kind, size in sorted(measured.items()):
            print(f"  {kind}: {size} vs {computed[kind]} (+{size - computed[kind]} header)")


if __name__ == "__main__":
    main()
