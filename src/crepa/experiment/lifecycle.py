"""The life of one training run inside an experiment, shared by in-process workers
(:mod:`crepa.experiment.runner`) and launched process groups (:mod:`crepa.experiment.launch`):
whether it finished, how it starts (resume or a cleared folder), the base-model stamp that decides it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from crepa.cache.atomic import atomic_write_json
from crepa.config import RunConfig, load_config
from crepa.rundir import CHECKPOINTS_DIR, SUMMARY_FILE, checkpoint_dirs
from crepa.train.recipe import train

BASE_STAMP_FILE = "base_model_stamp.json"  # the base model a run's folder was started from


def pretrained_stamp(config: RunConfig) -> str:
    """What identifies the base model a run starts from: for a local folder, a digest of every file's
    path, size and modification time (a rebuilt or replaced model changes it); for a hub id, the id and
    revision. Runs, samples and evaluations made from another base model are redone, never reused."""
    source = Path(config.model.pretrained)
    if not source.is_dir():
        return f"{config.model.pretrained}@{config.model.revision or 'main'}"
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        status = path.stat()
        digest.update(f"{path.relative_to(source)}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ExperimentStopped(RuntimeError):
    """A run stopped before its last step (Ctrl-C / SIGTERM, or its launched training failed): the
    experiment stops too, resumable."""


def started_from_current_base(config: RunConfig) -> bool:
    """Whether the run's folder was started from the base model the run file names as it is now."""
    try:
        recorded = json.loads((config.output.dir / BASE_STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return recorded.get("pretrained") == pretrained_stamp(config)


def training_finished(config: RunConfig) -> bool:
    """A run is finished when its summary (written last) says it ran all steps with this config, from
    the base model as it is now."""
    try:
        summary = json.loads((config.output.dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        not summary.get("interrupted")
        and summary.get("steps") == config.train.max_steps
        and summary.get("config") == json.loads(config.model_dump_json())
        and started_from_current_base(config)
    )


def start_run(config: RunConfig, run_file: Path) -> str | None:
    """How an unfinished run starts: "latest" when it has a checkpoint to resume from, else None after
    clearing its folder (the run file stays)."""
    output = config.output.dir
    if checkpoint_dirs(output / CHECKPOINTS_DIR) and started_from_current_base(config):
        return "latest"
    for path in output.iterdir():
        if path != run_file:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    atomic_write_json(output / BASE_STAMP_FILE, {"pretrained": pretrained_stamp(config)})
    return None


def train_run(run_file: Path) -> bool:
    """``crepa train RUN_FILE`` unless finished: resumes from the last checkpoint, or starts afresh in
    a cleared folder (the run file stays). Returns whether it trained. A top-level function, so worker
    processes can run it."""
    config = load_config(run_file)
    if training_finished(config):
        return False
    resume = start_run(config, run_file)
    if train(config, resume=resume, progress=False, announce=False).interrupted:
        raise ExperimentStopped(
            f"{config.output.dir.name}: training was interrupted (checkpoint saved); rerun the same command to "
            "resume the experiment"
        )
    return True
