"""``make gpu-check``: what a developer with a GPU for a few minutes runs, with one summary at the end.

1. ``pytest -m gpu`` (the GPU-only paths);
2. ``benchmarks/bench_real_step.py`` on CogVideoX-5B at 49 x 480 x 720 (no alignment, CREPA from the
   cache, REPA*, pixels, vae, RepVideo);
3. ``crepa demo --quick`` on CUDA (its worker pool included: ``--workers 2``).
Nothing is downloaded. Logs go to ``--logs`` (default ``runs/gpu-check``); exit 0 when all pass.

    python benchmarks/gpu_check.py [--logs DIR] [--skip bench,demo]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logs", type=Path, default=ROOT / "runs/gpu-check")
    parser.add_argument("--skip", default="", help="comma-separated: tests, bench, demo")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    checks = {
        "tests": [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations=0", "tests"],
        "bench": [python, "benchmarks/bench_real_step.py", "--family", "CogVideoX-5B", "--steps", "2", "--warmup", "1", "--rounds", "2", "--rows", "none,cache,repa,pixels,repvideo,none@13"],
        "demo": [python, "-m", "crepa", "demo", "--quick", "--workers", "2", "--no-progress", "--out", str(args.logs / "demo")],
    }  # fmt: skip
    skipped = set(filter(None, args.skip.split(",")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    summary = []
    for name, command in checks.items():
        if name in skipped:
            continue
        log = args.logs / f"{name}.log"
        print(f"== {name}: {' '.join(command[1:])} (log: {log})", flush=True)
        started = time.perf_counter()
        with log.open("w") as handle:
            code = subprocess.run(
                command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
            ).returncode
        seconds = time.perf_counter() - started
        tail = log.read_text(errors="replace").splitlines()[-12 if name == "bench" else -3 :]
        print("\n".join(tail), flush=True)
        summary.append((name, code, seconds))
    print("\n== gpu-check summary")
    for name, code, seconds in summary:
        print(f"{name:<6} {'PASS' if code == 0 else f'FAIL (exit {code})':<16} {seconds:7.1f} s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
