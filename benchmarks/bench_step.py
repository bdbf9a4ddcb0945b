"""Time and peak memory of one training step per teacher mode, side by side, plus the analytic
FLOP ratio of each mode's extra work at the real CogVideoX-5B shapes.

Modes (all through the trainer's own ``step_loss``, data loading from the cache included):
  none     diffusion loss only (crepa.enabled = false)
  cache    CREPA with teacher grids read from the precomputed cache
  pixels   CREPA encoding the decoded clean frames with the teacher inside the step
  vae      CREPA decoding the cached latents with the VAE, then the teacher, inside the step

The model is a Wan-architecture transformer sized so that the projector's share of the work is
near the real one: width 384 (6 heads x 64), 12 blocks, 624 video tokens per clip (49 frames at
96x128 -> 13 x 6 x 8 tokens), LoRA rank 16; projector hidden width 256 (= 2048 x 384 / 3072, the
paper's projector scaled with the model width); teacher a ViT-S-sized DINOv2 (384-d, 6 blocks).
Times: all modes in one process on one thread, steps interleaved (mode by mode within each round),
median CPU seconds per step, so load from other jobs on the machine hits every mode alike. Memory:
each mode in a fresh process; the peak RSS during the measured steps (the kernel's peak counter
reset with /proc/self/clear_refs after warm-up), and its rise over the RSS before those steps.

    python benchmarks/bench_step.py [--steps 6] [--warmup 2] [--skip-flops]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("none", "cache", "pixels", "vae")
FRAMES, HEIGHT, WIDTH = 49, 96, 128


def build_world(root: Path) -> Path:
    """Tiny Wan pipeline with a wider transformer, a ViT-S-sized DINOv2, 4 clips and a run file."""
    import diffusers
    from transformers import Dinov2Config, Dinov2Model

    from crepa.io.video import write_video
    from crepa.models.tiny_pipelines import save_tiny_pipeline

    save_tiny_pipeline("wan", root / "pipe")
    config = diffusers.WanTransformer3DModel.load_config(root / "pipe/transformer")
    wide = {**config, "num_attention_heads": 6, "attention_head_dim": 64, "ffn_dim": 1536, "num_layers": 12}
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel.from_config(wide).save_pretrained(root / "pipe/transformer")
    teacher = Dinov2Config(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, image_size=224)
    Dinov2Model(teacher).save_pretrained(root / "dino")
    (root / "clips").mkdir()
    t = np.arange(FRAMES)[:, None, None, None]
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(4):
        clip = ((np.stack([x, y, x + y], -1)[None] + 2 * (i + 1) * t) % 256).astype(np.uint8)
        write_video(root / f"clips/clip{i}.mp4", clip, fps=16)
        (root / f"clips/clip{i}.txt").write_text("a red ball rolls across the table")
    run = root / "run.toml"
    run.write_text(
        f"""
[model]
pretrained = "pipe"
gradient_checkpointing = false
[data]
source = "clips"
resolutions = [[{HEIGHT}, {WIDTH}]]
num_frames = [{FRAMES}]
[teacher]
name = "dino"
[crepa]
block_index = 4
projector_hidden_dim = 256
[lora]
rank = 16
alpha = 16
[train]
batch_size = 1
"""
    )
    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_step(run: Path, mode: str, feed: str = "loader"):
    """Build the trainer's parts for ``mode`` and return ``step(i)``: one optimiser step of batch i.

    feed "loader": batches from the cache through the trainer's DataLoader (one worker, prefetching);
    "memory": the same batches read beforehand and held in memory.
    """
    import itertools

    from crepa.config import load_config
    from crepa.models.loading import load_online_teacher, load_transformer, resolve_family, scheduler_alphas
    from crepa.regularizer import CrepaRegularizer
    from crepa.train.batches import BucketedBatchOrder, batch_loader
    from crepa.train.lora import add_lora
    from crepa.train.preflight import open_dataset
    from crepa.train.step import StepParts, step_loss

    overrides = ["crepa.enabled=false"] if mode == "none" else [f'cache.teacher_source="{mode}"']
    config = load_config(run, overrides)
    family = resolve_family(config)
    dataset = open_dataset(config, family, config.crepa.enabled)
    transformer = load_transformer(config, family, torch.float32)
    params = add_lora(transformer, family, config.lora)
    transformer.train()
    online = mode in ("pixels", "vae")
    teacher, vae = load_online_teacher(config, family, torch.device("cpu")) if online else (None, None)
    regularizer = None
    if config.crepa.enabled:
        teacher_dim = teacher.dim if teacher is not None else dataset.teacher_dim
        regularizer = CrepaRegularizer(transformer, config.crepa, teacher_dim=teacher_dim)
        params += list(regularizer.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    alphas = scheduler_alphas(config, family)
    parts = StepParts(
        config, family, transformer, transformer, regularizer, teacher, vae, torch.float32, alphas
    )
    order = BucketedBatchOrder(dataset.buckets, 1, 0)
    data = batch_loader(dataset, order, 0, num_workers=1, pin_memory=False)
    if feed == "memory":
        data = itertools.cycle([next(data) for _ in range(order.per_epoch)])

    def step(index: int) -> None:
        loss, _ = step_loss(parts, next(data), index, torch.Generator().manual_seed(index))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_times(run: Path, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of every mode, interleaved step by step in one process with one
    compute thread, so load from other jobs on the machine hits every mode alike: CPU seconds per
    teacher mode, and wall seconds of the cache mode fed by the DataLoader ("cache") and from memory
    ("cache-memory") for the data path (its worker's CPU time is not the step's)."""
    torch.set_num_threads(1)
    runners = {mode: make_step(run, mode) for mode in MODES}
    runners["cache-memory"] = make_step(run, "cache", feed="memory")
    for index in range(warmup):
        for runner in runners.values():
            runner(index)
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    walls: dict[str, list[float]] = {mode: [] for mode in ("cache", "cache-memory")}
    for index in range(warmup, warmup + steps):
        for mode, runner in runners.items():
            start, wall = time.process_time(), time.perf_counter()
            runner(index)
            times[mode].append(time.process_time() - start)
            if mode in walls:
                walls[mode].append(time.perf_counter() - wall)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    medians |= {f"wall {mode}": statistics.median(values) for mode, values in walls.items()}
    return medians


def measure_memory(run: Path, mode: str, steps: int, warmup: int) -> dict[str, float]:
    """Peak RSS (MiB) during ``steps`` steps of ``mode`` after warm-up, and its rise over the RSS
    before them (the step's transient memory); run in a fresh process."""
    runner = make_step(run, mode)
    for index in range(warmup):
        runner(index)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak-RSS counter
    for index in range(warmup, warmup + steps):
        runner(index)
    peak = _status_kib("VmHWM")
    return {"peak_mib": peak / 1024, "rise_mib": (peak - before) / 1024}


def analytic_flops() -> dict[str, float]:
    """Forward FLOPs at CogVideoX-5B shapes (49 x 480 x 720, 13 x 60 x 90 latents, DINOv2-g at 420 x 630),
    counted by torch's FlopCounterMode on meta tensors of the real architectures (no weights)."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Dinov2Config, Dinov2Model

    from crepa.align import build_projector

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.device("meta"):
        dit = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=48,
            attention_head_dim=64,
            num_layers=42,
            use_rotary_positional_embeddings=True,
            sample_height=60,
            sample_width=90,
        )
        latents, text = torch.randn(1, 13, 16, 60, 90), torch.randn(1, 226, 4096)
        rope = (torch.randn(17550, 64), torch.randn(17550, 64))
        projector = build_projector("mlp", 3072, 1536)
        dino = Dinov2Model(
            Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)
        )
        frames = torch.randn(49, 3, 420, 630)
        vae = diffusers.AutoencoderKLCogVideoX()
        z = torch.randn(1, 16, 13, 60, 90)
        dit_forward = count(lambda: dit(latents, text, torch.tensor([500]), image_rotary_emb=rope))
        projector_forward = count(lambda: projector(torch.randn(1, 17550, 3072)))
        teacher_forward = count(lambda: dino(pixel_values=frames))
        vae_decode = count(lambda: vae.decode(z))
    step = 3 * dit_forward  # forward + backward (2x forward) of the transformer, no checkpointing
    return {
        "step": step,
        "cache": 3 * projector_forward,
        "pixels": 3 * projector_forward + teacher_forward,
        "vae": 3 * projector_forward + teacher_forward + vae_decode,
    }


# (name, latent frames x height x width token grid after patching, width, blocks, teacher width)
REAL_SHAPES = (
    ("CogVideoX-5B 49x480x720", (13, 30, 45), 3072, 42, 1536),
    ("Wan2.1-14B 81x480x832", (21, 30, 52), 5120, 40, 1536),
    ("HunyuanVideo 129x720x1280", (33, 45, 80), 3072, 60, 1536),
)


def head_saved_bytes(grid: tuple[int, int, int], width: int, teacher_dim: int, recompute: bool) -> int:
    """Bytes autograd keeps for the CREPA head's backward beyond its inputs (the block output, already
    kept by the next checkpointed block, and the batch's teacher grid), counted with saved-tensor
    hooks on meta tensors of the real shape: bf16 block output and teacher grid, the trainer's
    projector (2048 hidden) computing in bf16 as under autocast (meta tensors skip autocast, so its
    weights are bf16 here; autocast's bf16 weight copies, ~27 MiB, are left out), ``recompute`` as
    the trainer runs it with gradient checkpointing."""
    from crepa.regularizer import CrepaConfig, CrepaRegularizer

    frames, height, width_tokens = grid
    with torch.device("meta"):
        head = CrepaRegularizer.__new__(CrepaRegularizer)
        torch.nn.Module.__init__(head)
        head.config = CrepaConfig()
        from crepa.align import build_projector

        head.projector = build_projector("mlp", width, teacher_dim, 2048).to(torch.bfloat16)
        student = torch.empty(
            1, frames, height, width_tokens, width, dtype=torch.bfloat16, requires_grad=True
        )
        teacher = torch.empty(1, frames, height, width_tokens, teacher_dim, dtype=torch.bfloat16)
    saved: dict[int, int] = {}  # by tensor identity: a tensor saved twice counts once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not any(tensor is x or tensor._base is x for x in (student, teacher)):
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if recompute:
            checkpoint(head._head, student, teacher, use_reentrant=False)
        else:
            head._head(student, teacher)
    return sum(saved.values())


def head_memory_report() -> list[str]:
    """Extra memory saved for backward by the CREPA head against the step's activation memory (the
    block inputs gradient checkpointing keeps: blocks x tokens x width x 2 bytes, a lower bound)."""
    lines = []
    for name, grid, width, blocks, teacher_dim in REAL_SHAPES:
        tokens = grid[0] * grid[1] * grid[2]
        activations = blocks * tokens * width * 2
        plain = head_saved_bytes(grid, width, teacher_dim, recompute=False)
        kept = head_saved_bytes(grid, width, teacher_dim, recompute=True)
        lines.append(
            f"  {name:<27} {tokens:>7} tokens  activations {activations / 2**30:6.2f} GiB  "
            f"head without recompute {plain / 2**30:5.2f} GiB ({100 * plain / activations:5.1f}%)  "
            f"as trained {kept / 2**20:7.2f} MiB ({100 * kept / activations:5.2f}%)"
        )
    return lines


def _child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # ["times", RUN, STEPS, WARMUP] or ["memory", RUN, MODE, STEPS, WARMUP]
        kind, run, *rest = args.child
        if kind == "times":
            print(json.dumps(measure_times(Path(run), int(rest[0]), int(rest[1]))))
        else:
            print(json.dumps(measure_memory(Path(run), rest[0], int(rest[1]), int(rest[2]))))
        return
    from crepa.config import load_config
    from crepa.precompute import precompute

    counts = (str(args.steps), str(args.warmup))
    with tempfile.TemporaryDirectory() as tmp:
        run = build_world(Path(tmp))
        precompute(load_config(run), progress=False)
        seconds = _child("times", str(run), *counts)
        memory = {mode: _child("memory", str(run), mode, *counts) for mode in MODES}
    print(
        f"Wan-architecture transformer 384-d x 12 blocks, 624 tokens, LoRA 16, batch 1; "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'mode':<8}{'CPU s/step':>11}{'x none':>9}{'peak RSS MiB':>14}{'x none':>9}{'step rise MiB':>15}")
    for mode in MODES:
        peak, rise = memory[mode]["peak_mib"], memory[mode]["rise_mib"]
        print(
            f"{mode:<8}{seconds[mode]:>11.3f}{seconds[mode] / seconds['none']:>9.3f}"
            f"{peak:>14.0f}{peak / memory['none']['peak_mib']:>9.3f}{rise:>15.1f}"
        )
    feed = seconds["wall cache"] / seconds["wall cache-memory"]
    print(
        f"\ndata path (cache mode, wall s/step): DataLoader {seconds['wall cache']:.3f}, "
        f"tensors in memory {seconds['wall cache-memory']:.3f}, ratio {feed:.3f}"
    )
    print("\nExtra memory saved for backward by the CREPA head (bf16, batch 1):")
    print("\n".join(head_memory_report()))
    if not args.skip_flops:
        flops = analytic_flops()
        print("\nAnalytic extra work per step at CogVideoX-5B shapes (49x480x720, DINOv2-g at 420x630):")
        print(f"  training step (transformer fwd+bwd): {flops['step'] / 1e12:.0f} TFLOP")
        for mode in ("cache", "pixels", "vae"):
            print(
                f"  {mode:<7} +{flops[mode] / 1e12:8.1f} TFLOP = {100 * flops[mode] / flops['step']:6.2f}% of the step"
            )


if __name__ == "__main__":
    main()
