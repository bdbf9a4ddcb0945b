"""Time of `crepa eval`'s per-clip metrics on CPU, split by stage (decode, features, flicker, flow).

Writes N synthetic mp4 clips (49 frames, 256x256, moving textures; not timed, kept in --workdir for
re-runs), then evaluates them through the same code as the command: tiny random DINO (subject
consistency) and CLIP (background consistency) extractors at VBench's 224-pixel inputs, temporal
flickering, OpenCV flow forward and backward for the warping error, dynamic degree and flow
magnitude.

    python benchmarks/bench_eval.py [--clips 100] [--frames 49] [--size 256] [--flow dis]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crepa.eval.evaluate import evaluate_clips, resolve_metrics
from crepa.eval.extractors import load_extractor
from crepa.eval.tiny import save_tiny_extractors
from crepa.eval.videos import find_clips
from crepa.io.video import write_video


def synthetic_clip(frames: int, size: int, seed: int) -> np.ndarray:
    """A smooth random texture drifting by a random sub-pixel velocity, uint8 (T, size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, size // 16, size // 16), dtype=np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=(2 * size, 2 * size), mode="bicubic")[0]
    velocity = rng.uniform(-3, 3, size=2)
    clip = []
    for t in range(frames):
        dy, dx = (velocity * t).round().astype(int) % size
        clip.append(texture[:, dy : dy + size, dx : dx + size])
    return (torch.stack(clip).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--flow", default="dis", choices=["dis", "farneback"])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "crepa_bench_eval")
    args = parser.parse_args()

    videos = args.workdir / f"clips_{args.clips}x{args.frames}x{args.size}"
    start = time.perf_counter()
    for index in range(args.clips):
        path = videos / f"clip_{index:04d}.mp4"
        if not path.exists():
            write_video(path, synthetic_clip(args.frames, args.size, seed=index), fps=16)
    print(f"clips ready in {videos} ({time.perf_counter() - start:.1f}s, not counted)")

    tiny = save_tiny_extractors(args.workdir / "extractors")
    extractors = {
        "subject_consistency": load_extractor(f"dino:{tiny['dino']}"),
        "background_consistency": load_extractor(f"clip:{tiny['clip']}"),
    }
    metrics = resolve_metrics(None, with_reference=False)
    start = time.perf_counter()
    result = evaluate_clips(find_clips(videos), metrics, extractors, flow_method=args.flow)
    total = time.perf_counter() - start
    stages = {stage: round(seconds, 2) for stage, seconds in result.timings.items()}
    report = {
        "clips": len(result.clips),
        "frames": args.frames,
        "size": args.size,
        "flow": args.flow,
        "torch_threads": torch.get_num_threads(),
        "total_s": round(total, 2),
        "clips_per_s": round(len(result.clips) / total, 3),
        "stages_s": stages,
        "other_s": round(total - sum(result.timings.values()), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
