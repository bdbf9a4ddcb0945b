"""Time and peak memory of one training step with RepVideo against the plain model, side by side.

A training step is forward, a mean-square loss on the output, and backward, with LoRA (rank 16) on
the attention projections as the trainable weights (plus the gates for RepVideo, initialised to 0.5
so every gated block does mix). Variants, at the same shapes, with and without gradient
checkpointing (diffusers' non-reentrant one):
  plain     the transformer as diffusers builds it
  repvideo  the same weights with crepa.repvideo.install_repvideo(window=...)

Times are medians over steps interleaved across the variants (machine noise hits all alike), as
wall time and as the process's CPU time (one thread by default, so CPU time is the compute itself
and is not inflated while other jobs hold the cores). Peak
memory is measured in a fresh child process per variant: glibc is told to mmap every allocation of
64 KiB or more (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set; after a warm-up
step the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and VmHWM - VmRSS(before)
of the next step is its extra peak memory.

    python benchmarks/bench_repvideo.py [--family wan] [--depth 12] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from crepa.config import LoraSection
from crepa.models import detect_family
from crepa.models.tiny import tiny_inputs, tiny_transformer
from crepa.repvideo import RepVideoGates, install_repvideo
from crepa.train.lora import add_lora
from peak_memory import reset_peak, status_kib

VARIANTS = ("plain", "repvideo", "plain+ckpt", "repvideo+ckpt")


def model_overrides(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Init kwargs that scale the family's tiny config up to the benchmark's width and depth."""
    common = dict(num_attention_heads=args.heads, attention_head_dim=args.head_dim, num_layers=args.depth)
    if family == "wan":
        return {**common, "in_channels": 16, "out_channels": 16, "ffn_dim": 4 * args.heads * args.head_dim}
    if family == "cogvideox":
        return {
            **common,
            "in_channels": 16,
            "out_channels": 16,
            "time_embed_dim": 64,
            "sample_frames": 4 * (args.frames - 1) + 1,
            "sample_height": args.height * 2,
            "sample_width": args.width * 2,
        }
    raise ValueError(f"--family: wan or cogvideox (got {family!r})")


def build(variant: str, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], RepVideoGates | None]:
    """The transformer of ``variant`` (same weights for every variant), its forward inputs, its gates."""
    transformer = tiny_transformer(args.family, seed=0, **model_overrides(args.family, args))
    add_lora(transformer, detect_family(transformer), LoraSection(rank=16, alpha=16.0))
    if variant.endswith("+ckpt"):
        transformer.enable_gradient_checkpointing()
    gates = (
        install_repvideo(transformer, args.window, gate_init=0.5) if variant.startswith("repvideo") else None
    )
    inputs = tiny_inputs(
        args.family,
        transformer,
        batch=1,
        frames=args.frames,
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(1),
    )
    return transformer, inputs, gates


def training_step(transformer: nn.Module, inputs: dict[str, Any], gates: RepVideoGates | None) -> None:
    output = transformer(**inputs, return_dict=False)[0]
    output.square().mean().backward()
    transformer.zero_grad(set_to_none=True)
    if gates is not None:
        gates.zero_grad(set_to_none=True)


def child_peak_memory(variant: str, args: argparse.Namespace) -> None:
    """Run one step of ``variant`` and print its extra peak memory in MiB (in a fresh process)."""
    model = build(variant, args)
    training_step(*model)  # warm-up: first-touch allocations of libraries
    before = reset_peak()
    training_step(*model)
    print(json.dumps({"extra_mib": (status_kib("VmHWM") - before) / 1024}))


def peak_memory(variant: str, argv: list[str]) -> float:
    code = (
        f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_repvideo as b; "
        f"b.child_peak_memory({variant!r}, b.parse_args({argv!r}))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mib"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="wan", choices=["wan", "cogvideox"])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--height", type=int, default=24, help="latent rows")
    parser.add_argument("--width", type=int, default=40, help="latent columns")
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    models = {variant: build(variant, args) for variant in VARIANTS}
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    width = args.heads * args.head_dim
    gates = models["repvideo"][2]
    assert gates is not None
    gated = sum(gates.is_gated(index) for index in range(gates.depth))
    print(
        f"{args.family}: {args.depth} blocks ({gated} gated, window {args.window}), width {width}, "
        f"{tokens} tokens (latent {args.frames}x{args.height}x{args.width}), batch 1, float32, "
        f"{torch.get_num_threads()} threads; one activation = {tokens * width * 4 / 2**20:.2f} MiB"
    )
    wall: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for model in models.values():
        training_step(*model)  # warm-up
    for _ in range(args.steps):
        for variant, model in models.items():  # interleaved
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            training_step(*model)
            wall[variant].append(time.perf_counter() - start_wall)
            cpu[variant].append(time.process_time() - start_cpu)
    del models, gates
    memory = {variant: peak_memory(variant, argv) for variant in VARIANTS}
    columns = ("wall ms", "vs plain", "CPU ms", "vs plain", "peak extra MiB", "vs plain")
    print("\n" + f"{'variant':<15}" + "".join(f"{column:>{len(column) + 2}}" for column in columns))
    for variant in VARIANTS:
        baseline = variant.replace("repvideo", "plain")
        wall_ms, base_wall_ms = (statistics.median(wall[name]) * 1e3 for name in (variant, baseline))
        cpu_ms, base_cpu_ms = (statistics.median(cpu[name]) * 1e3 for name in (variant, baseline))
        values = (wall_ms, wall_ms - base_wall_ms, cpu_ms, cpu_ms - base_cpu_ms)
        values += (memory[variant], memory[variant] - memory[baseline])
        cells = [
            f"{value:>{'+' if column == 'vs plain' else ''}{len(column) + 2}.1f}"
            for column, value in zip(columns, values, strict=True)
        ]
        print(f"{variant:<15}" + "".join(cells))


if __name__ == "__main__":
    main()
