"""Training runs of an experiment as ``accelerate launch`` jobs: each run trained by its own group of
``--processes-per-run`` processes, several runs at once.

On CUDA the visible GPUs are split into groups of consecutive devices and each group trains one run
at a time (its processes see only that group's GPUs); on the CPU (gloo) ``--workers`` runs go at
once. Each launch writes its output to ``<run dir>/launch.log``. Which runs train, resume or restart
is decided as for in-process runs (:func:`crepa.experiment.lifecycle.train_run`).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import torch

from crepa.config import ConfigError, load_config
from crepa.experiment.lifecycle import ExperimentStopped, start_run, training_finished
from crepa.experiment.workers import run_jobs

LAUNCH_LOG = "launch.log"
LOG_TAIL_LINES = 25
LAUNCHABLE = ("MULTI_GPU", "FSDP")  # accelerate distributed types crepa train runs under (DDP, FSDP2)


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as CUDA_VISIBLE_DEVICES entries (none without CUDA)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in listed.split(",")] if listed else [str(i) for i in range(count)]
    return names[:count]


def device_groups(devices: Sequence[str], per_run: int, log: Callable[[str], None] = print) -> list[str]:
    """CUDA_VISIBLE_DEVICES values of consecutive groups of ``per_run`` devices, one run each; devices
    left over stay idle (said in the log)."""
    if per_run > len(devices):
        raise ConfigError(
            f"--processes-per-run {per_run}: only {len(devices)} GPU(s) visible ({','.join(devices) or 'none'}); "
            f"use --processes-per-run {len(devices)} or fewer"
        )
    groups = [",".join(devices[start : start + per_run]) for start in range(0, len(devices), per_run)]
    if len(devices) % per_run:
        idle = groups.pop()
        log(
            f"--processes-per-run {per_run}: {len(groups)} run(s) at once on {len(devices)} GPUs; GPU(s) {idle} "
            "stay idle"
        )
    return groups


def check_accelerate_config(path: Path) -> None:
    """A config file accelerate reads, that launches data parallel (DDP) or FSDP processes."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        settings = load_config_from_file(str(path))
    except Exception as error:  # accelerate's loader raises OS, YAML / JSON and value errors
        raise ConfigError(f"--accelerate-config {path}: {error}") from None
    kind = getattr(settings.distributed_type, "value", settings.distributed_type)
    if kind not in LAUNCHABLE:
        raise ConfigError(
            f"--accelerate-config {path}: distributed_type is {kind!r}; crepa experiment launches "
            f"{' or '.join(LAUNCHABLE)} configs (see examples/accelerate/ddp.yaml and fsdp.yaml)"
        )


def launch_slots(
    per_run: int, workers: int, accelerate_config: Path | None, log: Callable[[str], None] = print
) -> list[dict[str, str]]:
    """The environments launched runs train in, one per run going at once: a GPU group each on CUDA,
    else ``workers`` CPU slots. Refuses impossible options before any work starts."""
    if accelerate_config is not None:
        check_accelerate_config(accelerate_config)
    gpus = visible_gpus()
    if not gpus:
        return [{} for _ in range(workers)]
    return [{"CUDA_VISIBLE_DEVICES": group} for group in device_groups(gpus, per_run, log)]


def free_port() -> int:
    """A port nobody listens on now (another launch on the machine may hold accelerate's default)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(
    run_file: Path, processes: int, port: int, resume: str | None, accelerate_config: Path | None
) -> list[str]:
    """``crepa train RUN_FILE`` in ``processes`` processes on this machine under ``accelerate launch``:
    DDP, or the topology of ``accelerate_config``. The run file decides precision and compilation, so
    the launcher's own are off; the experiment assigns GPUs, so a config's ``gpu_ids`` are ignored."""
    topology = ["--config_file", str(accelerate_config)] if accelerate_config is not None else ["--multi_gpu"]
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", *topology),
        *("--num_processes", str(processes), "--num_machines", "1", "--gpu_ids", "all"),
        *("--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "crepa", "train", str(run_file), "--no-progress"),
        *(["--resume", resume] if resume is not None else []),
    ]


def launch_run(run_file: Path, processes: int, accelerate_config: Path | None, env: dict[str, str]) -> bool:
    """:func:`~crepa.experiment.lifecycle.train_run` as a launched job with ``env`` added (its GPUs);
    returns whether it trained. A failed or interrupted launch raises ExperimentStopped with the
    tail of the run's launch.log."""
    config = load_config(run_file)
    if training_finished(config):
        return False
    command = launch_command(run_file, processes, free_port(), start_run(config, run_file), accelerate_config)
    log_file = config.output.dir / LAUNCH_LOG
    bindir = Path(sys.executable).parent  # the launcher's tools first on PATH; output unbuffered
    env = {**os.environ, **env, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    with log_file.open("a", encoding="utf-8") as log:  # a resumed run's log continues
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not training_finished(config):
        raise ExperimentStopped(
            f"{config.output.dir.name}: `crepa train` in {processes} processes stopped (exit code {code}); its "
            f"checkpoints are kept and rerunning the same command resumes it. From {log_file}:\n{log_tail(log_file)}"
        )
    return True


def log_tail(log_file: Path) -> str:
    """The last lines of a launch log, above the launcher's own traceback when a process failed (that
    only says which rank failed; the lines above say why)."""
    text = log_file.read_text(encoding="utf-8", errors="replace")
    report = text.rfind("Traceback (most recent call last):")
    if report >= 0 and "ChildFailedError" in text[report:]:
        text = text[:report]
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def launch_runs(
    run_files: Sequence[Path],
    slots: Sequence[dict[str, str]],
    processes: int,
    accelerate_config: Path | None,
    progress: bool = True,
) -> None:
    """Train ``run_files`` by :func:`launch_run`, one per slot at a time, as many at once as there are
    slots (a thread waits on each launch)."""
    free: Queue[dict[str, str]] = Queue()
    for slot in slots:
        free.put(slot)

    def train_on_a_free_slot(run_file: Path) -> bool:
        slot = free.get()
        try:
            return launch_run(run_file, processes, accelerate_config, slot)
        finally:
            free.put(slot)

    try:
        with ThreadPoolExecutor(len(slots)) as pool:
            run_jobs(pool, train_on_a_free_slot, run_files, "fine-tune", progress)
    except KeyboardInterrupt:  # the launched processes got it too: they save a checkpoint and stop
        raise ExperimentStopped(
            "interrupted: the runs in training saved a checkpoint; rerun the same command to resume"
        ) from None
