"""Forward+backward time and peak memory of the CREPA loss, side by side in one run.

Compares, at CogVideoX-5B-like sizes (B=1, F=13, N=1350, D=1536):
  crepa       crepa.align.cross_frame_alignment
  frame-loop  a per-frame Python loop over (frame, neighbour) pairs with F.cosine_similarity
  floor       the bandwidth floor: one elementwise pass reading student and teacher once and
              writing one student-sized tensor, done twice (once for forward, once for backward)

Peak memory is measured in a fresh child process per variant: the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs`` = 5) after the inputs exist, and VmHWM - VmRSS(before) is the
extra memory the variant needed. Times are the median of repeated runs, variants interleaved.

    python benchmarks/bench_align.py [--distance 1 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from crepa.align import cross_frame_alignment
from peak_memory import reset_peak, status_kib

SHAPE = (1, 13, 1350, 1536)


def frame_loop(student: torch.Tensor, teacher: torch.Tensor, distance: int, tau: float = 1.0) -> torch.Tensor:
    """The straightforward per-frame implementation (what a first version usually looks like)."""
    frames = student.shape[1]
    total = student.new_zeros(())
    for f in range(frames):
        total = total + F.cosine_similarity(student[:, f], teacher[:, f], dim=-1).mean()
        if distance:
            for k in (f - distance, f + distance):
                if 0 <= k < frames:
                    weight = math.exp(-abs(k - f) / tau)
                    total = total + weight * F.cosine_similarity(student[:, f], teacher[:, k], dim=-1).mean()
    return -total / frames


def run_variant(name: str, student: torch.Tensor, teacher: torch.Tensor, distance: int) -> None:
    if name == "floor":
        forward_out = student.detach() * teacher  # forward: read both, write one
        backward_out = student.detach() * teacher  # backward: read both, write one (the gradient)
        del forward_out, backward_out
        return
    leaf = student.detach().requires_grad_(True)
    if name == "crepa":
        loss = cross_frame_alignment(leaf, teacher, distance=distance).loss
    else:
        loss = frame_loop(leaf, teacher, distance)
    loss.backward()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPE, generator=gen), torch.randn(*SHAPE, generator=gen)


def child_peak_memory(name: str, distance: int) -> None:
    """Run one variant once and print its extra peak memory in MiB (called in a fresh process)."""
    student, teacher = inputs()
    run_variant(name, student, teacher, distance)  # warm-up: first-touch allocations of libraries
    before = reset_peak()
    run_variant(name, student, teacher, distance)
    print(json.dumps({"extra_mib": (status_kib("VmHWM") - before) / 1024}))


def peak_memory(name: str, distance: int) -> float:
    code = f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_align as b; b.child_peak_memory({name!r}, {distance})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distance", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    student, teacher = inputs()
    tensor_mib = student.numel() * student.element_size() / 2**20
    print(
        f"shape (B, F, N, D) = {SHAPE}, float32, {torch.get_num_threads()} threads; one tensor = {tensor_mib:.0f} MiB"
    )
    names = ["crepa", "frame-loop", "floor"]
    for distance in args.distance:
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            run_variant(name, student, teacher, distance)  # warm-up
        for _ in range(args.repeats):
            for name in names:  # interleaved, so machine noise hits every variant alike
                start = time.perf_counter()
                run_variant(name, student, teacher, distance)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        memory = {name: peak_memory(name, distance) for name in names}
        print(f"\nd = {distance}")
        print(f"{'variant':<12}{'fwd+bwd ms':>12}{'x floor':>9}{'peak extra MiB':>16}{'x floor':>9}")
        for name in names:
            print(
                f"{name:<12}{medians[name] * 1e3:>12.1f}{medians[name] / medians['floor']:>9.2f}"
                f"{memory[name]:>16.0f}{memory[name] / memory['floor']:>9.2f}"
            )


if __name__ == "__main__":
    main()
