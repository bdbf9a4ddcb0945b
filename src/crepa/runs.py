"""A training run's output directory read back: its run file, its checkpoints and its trained weights.

``crepa train`` writes ``run_config.json`` (the validated run file) when it starts and
``training_summary.json`` (which holds it too) when it ends; a run directory is either. Trained
weights are the final files (``pytorch_lora_weights.safetensors`` or ``transformer/``, and
``repvideo_gates.safetensors``) or those of one checkpoint (``checkpoints/step-XXXXXX``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from crepa.config import RunConfig
from crepa.rundir import (
    CHECKPOINT_TENSORS,
    CHECKPOINTS_DIR,
    GATES_FILE,
    LORA_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TRANSFORMER_DIR,
    checkpoint_dirs,
    step_name,
)


class RunDirectoryError(ValueError):
    """A run directory (or checkpoint in it) that cannot be used; the message says what to give instead."""


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The run file a run directory was trained with."""
    run_dir = Path(run_dir)
    for path, key in ((run_dir / RUN_CONFIG_FILE, None), (run_dir / SUMMARY_FILE, "config")):
        if path.is_file():
            document = json.loads(path.read_text())
            try:
                return RunConfig.model_validate(document[key] if key else document)
            except (KeyError, ValidationError) as error:
                raise RunDirectoryError(f"{path}: not a run file this crepa can read ({error})") from None
    raise RunDirectoryError(
        f"{run_dir}: not a crepa run directory (no {RUN_CONFIG_FILE} or {SUMMARY_FILE}); give the "
        "output.dir of a `crepa train` run"
    )


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    """``run_dir/checkpoints/NAME`` (NAME like ``step-000750``, or a step number); checked to exist."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if name.isdigit():
        name = step_name(int(name))
    path = root / name
    if not (path / CHECKPOINT_TENSORS).is_file():
        raise RunDirectoryError(f"checkpoint {name}: not in {root}; {_checkpoint_choice(Path(run_dir))}")
    return path


def _checkpoint_choice(run_dir: Path) -> str:
    """The checkpoints ``run_dir`` offers, or that training has saved none yet."""
    found = checkpoint_dirs(run_dir / CHECKPOINTS_DIR)
    if not found:
        return (
            f"the run has no checkpoints yet in {run_dir / CHECKPOINTS_DIR} (training saves one every "
            "train.checkpoint_every steps, at the last step and when stopped by Ctrl-C / SIGTERM)"
        )
    return f"checkpoints there: {', '.join(path.name for path in found)}"


def _strip_adapter(name: str) -> str:
    """peft parameter name -> saved LoRA name: ``...lora_A.default.weight`` -> ``...lora_A.weight``."""
    return name.replace(".default.", ".")


def _unfinished(run_dir: Path, missing: str) -> RunDirectoryError:
    choice = _checkpoint_choice(run_dir)
    if not checkpoint_dirs(run_dir / CHECKPOINTS_DIR):
        return RunDirectoryError(f"{run_dir}: no {missing}: the run has not finished, and {choice}")
    return RunDirectoryError(
        f"{run_dir}: no {missing}: the run has not finished; give one of its checkpoints with "
        f"--checkpoint ({choice})"
    )


def read_transformer_weights(
    run_dir: str | Path, config: RunConfig, checkpoint: str | None = None
) -> dict[str, torch.Tensor] | None:
    """The trained transformer tensors of ``run_dir`` (final) or of ``checkpoint`` (``"step-000750"``).

    LoRA runs: the LoRA tensors with peft's names, adapter name left out
    (``blocks.0.attn1.to_q.lora_A.weight``). Full fine-tuning: a checkpoint's parameters by name, or
    None for the final weights, which are the ``transformer/`` folder (``from_pretrained``).
    """
    run_dir = Path(run_dir)
    if checkpoint is not None:
        tensors = load_file(str(checkpoint_dir(run_dir, checkpoint) / CHECKPOINT_TENSORS))
        return {
            _strip_adapter(key.removeprefix("transformer.")): value
            for key, value in tensors.items()
            if key.startswith("transformer.")
        }
    if not config.lora.enabled:
        if not (run_dir / TRANSFORMER_DIR / "config.json").is_file():
            raise _unfinished(run_dir, "transformer/ folder")
        return None
    path = run_dir / LORA_FILE
    if not path.is_file():
        raise _unfinished(run_dir, LORA_FILE)
    return {key.removeprefix("transformer."): value for key, value in load_file(str(path)).items()}


def read_gates(run_dir: str | Path, config: RunConfig, checkpoint: str | None = None) -> torch.Tensor:
    """The trained RepVideo gates (depth,) of ``run_dir`` (final) or of ``checkpoint``."""
    run_dir = Path(run_dir)
    if not config.repvideo.enabled:
        raise RunDirectoryError(f"{run_dir}: this run did not train RepVideo (repvideo.enabled = false)")
    if checkpoint is not None:
        return load_file(str(checkpoint_dir(run_dir, checkpoint) / CHECKPOINT_TENSORS))["repvideo_gates.gate"]
    path = run_dir / GATES_FILE
    if not path.is_file():
        raise _unfinished(run_dir, GATES_FILE)
    return load_file(str(path))["gate"]


def final_step(run_dir: str | Path) -> int | None:
    """Steps of a finished run (from its summary), else None."""
    path = Path(run_dir) / SUMMARY_FILE
    return int(json.loads(path.read_text())["steps"]) if path.is_file() else None
