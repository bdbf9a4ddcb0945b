"""``make gpu-check``: what a developer with a GPU for a few minutes runs, with one summary at the end.

1. ``bench``: ``benchmarks/bench_real_step.py`` on CogVideoX-5B at 49 x 480 x 720 (no alignment, CREPA
   from the cache, REPA*, pixels, RepVideo, and 13 of 42 blocks checkpointed; the teacher alone and a
   profile of the pixels step), alone on the GPU so its timings are clean;
2. then side by side: ``tests``, ``pytest -m gpu`` (the GPU-only paths; a few pytest-xdist workers when
   it is installed), and ``demo``, ``crepa demo --quick`` on CUDA (its worker pool included);
3. ``suite`` (not by default: it needs a second device call within the 10-minute limit): the default
   test suite with CUDA present;
4. ``fit`` (not by default; a device call of about 4 minutes): issue 21's three fits, side by side,
   each ``bench_real_step.py --fit``: CogVideoX-5B in 24 GiB, Wan 2.1 14B in 24 GiB with fp8 weights
   (and the offload crepa plan adds), HunyuanVideo in 48 GiB; each trains crepa plan's pick and fails
   when its measured peak exceeds the budget or misses the prediction by more than 15 %.
Each check has a time limit (its whole process group is killed past it), so the summary always
comes; the default checks end within 8 minutes. Nothing is downloaded. Logs go to ``--logs``
(default ``runs/gpu-check``): one file per check and the demo's ``report.md`` as ``demo-report.md``,
the demo's own folder (hundreds of files) in a temporary one, so that ``--logs $OUT`` stays within what
a device call brings back (8 files); exit 0 when every check passed.

    python benchmarks/gpu_check.py [--logs DIR] [--checks bench,tests,demo] [--workers 4]
    python benchmarks/gpu_check.py --checks suite          # the default suite with CUDA present
    python benchmarks/gpu_check.py --checks fit            # crepa plan's picks, measured
    python3 benchmarks/gpu_check.py --wheels .whl --logs $OUT   # a machine without the index (gpu_wheels.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# seconds; bench + max(tests, demo) < 8 min
TIME_LIMITS = {"bench": 210, "tests": 260, "demo": 260, "suite": 540, "fit": 270}
TAIL_LINES = {"bench": 14, "tests": 25, "demo": 4, "suite": 8, "fit": 6}
FITS = {"fit-cogvideox": ("CogVideoX-5B", "24GiB"), "fit-wan": ("Wan2.1-T2V-14B", "24GiB", "--base-precision", "fp8"), "fit-hunyuan": ("HunyuanVideo", "48GiB")}  # fmt: skip


@dataclass
class Outcome:
    name: str
    code: int | None  # None: killed at its time limit
    seconds: float


def commands(python: str, demo_out: Path, workers: int) -> dict[str, list[str]]:
    parallel = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
    return {
        "bench": [python, "benchmarks/bench_real_step.py", "--family", "CogVideoX-5B", "--steps", "2", "--warmup", "1", "--rounds", "2", "--rows", "none,cache,repa,pixels,repvideo,none@13", "--profile", "pixels"],
        "tests": [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *parallel, "--durations=15", "tests"],
        "demo": [python, "-m", "crepa", "demo", "--quick", "--workers", "2", "--no-progress", "--out", str(demo_out)],
        "suite": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(max(2, (os.cpu_count() or 2) - 2)), "tests"],
        **{name: [python, "benchmarks/bench_real_step.py", "--family", family, "--fit", budget, *fixed, "--rows", "cache", "--steps", "1", "--warmup", "1", "--rounds", "1"] for name, (family, budget, *fixed) in FITS.items()},
    }  # fmt: skip


def limit(name: str) -> int:
    return TIME_LIMITS[name.partition("-")[0]]


def start(name: str, command: list[str], logs: Path, env: dict[str, str]) -> subprocess.Popen:
    print(f"== {name}: {' '.join(command[1:])} (limit {limit(name)} s, log {logs / name}.log)", flush=True)
    handle = (logs / f"{name}.log").open("w")
    # a session of its own: a check past its limit is killed with every process it started
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_all(running: dict[str, subprocess.Popen], logs: Path) -> list[Outcome]:
    """Wait for the checks started together; kill each at its own limit; print each log's tail."""
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    while len(outcomes) < len(running):
        elapsed = time.perf_counter() - started
        for name, process in running.items():
            if name in outcomes:
                continue
            code = process.poll()
            if code is None and elapsed > limit(name):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if code is not None or elapsed > limit(name):
                outcomes[name] = Outcome(name, code, elapsed)
                tail = (
                    (logs / f"{name}.log")
                    .read_text(errors="replace")
                    .splitlines()[-TAIL_LINES[name.partition("-")[0]] :]
                )
                print(f"-- {name} ({'killed at its limit' if code is None else f'exit {code}'}):")
                print("\n".join(tail), flush=True)
        time.sleep(1)
    return [outcomes[name] for name in running]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logs", type=Path, default=ROOT / "runs/gpu-check")
    parser.add_argument(
        "--checks", default="bench,tests,demo", help="comma-separated: bench, tests, demo, suite, fit"
    )
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers of the GPU tests")
    parser.add_argument(
        "--wheels",
        type=Path,
        help="install these wheels (benchmarks/gpu_wheels.py) into a folder of their own first",
    )
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    chosen = [name for name in args.checks.split(",") if name]
    if "fit" in chosen:
        chosen = [name for name in chosen if name != "fit"] + list(FITS)
    # the demo's folder and the installed wheels: not under --logs (logs travel back), removed at the end
    scratch = Path(tempfile.mkdtemp(prefix="crepa-gpu-check-"))
    try:
        return run_checks(parser, args, chosen, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_checks(
    parser: argparse.ArgumentParser, args: argparse.Namespace, chosen: list[str], scratch: Path
) -> int:
    """Run the ``chosen`` checks, the demo and the wheels in ``scratch``; print the summary."""
    demo_out = scratch / "demo"
    known = commands(sys.executable, demo_out, args.workers)
    if unknown := set(chosen) - set(known):
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(known)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    paths = [str(ROOT / "src")]  # crepa itself, installed or not
    if args.wheels is not None:
        if not (wheels := sorted(args.wheels.glob("*.whl"))):
            parser.error(
                f"--wheels {args.wheels}: no wheels there: `make gpu-wheels` fills it, and the copy of the repo must bring it along"
            )
        site = scratch / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--upgrade", "--target", str(site), *map(str, wheels)],
            check=True,
        )  # fmt: skip
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    outcomes: list[Outcome] = []
    # the benchmark alone (timings), then the rest side by side (wall time), the suite last (CPU-bound)
    for group in (["bench"], ["tests", "demo"], ["suite"], list(FITS)):
        names = [name for name in group if name in chosen]
        if names:
            running = {name: start(name, known[name], args.logs, env) for name in names}
            outcomes += wait_all(running, args.logs)
    if (demo_out / "report.md").exists():
        shutil.copyfile(demo_out / "report.md", args.logs / "demo-report.md")
        print(f"demo: report.md copied to {args.logs / 'demo-report.md'}")
    print("\n== gpu-check summary")
    for outcome in outcomes:
        verdict = (
            "TIME LIMIT"
            if outcome.code is None
            else "PASS"
            if outcome.code == 0
            else f"FAIL (exit {outcome.code})"
        )
        print(f"{outcome.name:<13} {verdict:<16} {outcome.seconds:7.1f} s")
    return 0 if all(outcome.code == 0 for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
