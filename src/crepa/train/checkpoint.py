"""Training checkpoints: written to a temporary directory and renamed into place, last K kept.

A checkpoint ``step-000123/`` holds ``trainable.safetensors`` (trainable transformer parameters —
LoRA or all — plus the projector and any RepVideo gates, by name), ``training_state.pt`` (optimiser,
LR scheduler, alignment schedule, step, data position) and ``rng-rank{r}.pt`` per process.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """``--resume latest`` -> newest checkpoint (None if there is none yet); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a crepa checkpoint (no training_state.pt in it)")
    return path


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Trainable parameters of each module, keyed "<module>.<parameter name>"."""
    return {
        f"{prefix}.{name}": param.detach().to("cpu").contiguous()
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back in place; every trainable parameter must be present."""
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise KeyError(
                    f"checkpoint lacks {key}: was it written by a run with other LoRA / model settings?"
                )
            with torch.no_grad():
                param.copy_(tensors[key].to(param.device, param.dtype))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(root: Path, step: int) -> Path:
    """The temporary directory a checkpoint of ``step`` is written into before the rename."""
    return root / f".tmp-step-{step:06d}"


def write_checkpoint_files(
    directory: Path, tensors: dict[str, torch.Tensor] | None, state: dict[str, Any] | None, rank: int
) -> None:
    """Write this process's part of a checkpoint into the staging ``directory`` (rank 0 writes the model)."""
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, str(directory / "trainable.safetensors"))
    if state is not None:
        torch.save(state, directory / "training_state.pt")
    torch.save(rng_state(), directory / f"rng-rank{rank}.pt")


def publish_checkpoint(root: Path, step: int, keep: int) -> Path:
    """Rename the staging directory into place (atomic) and delete all but the newest ``keep``."""
    final = root / f"step-{step:06d}"
    staged = staging_dir(root, step)
    for path in staged.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(
    directory: Path, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """(trainable tensors, training state, this rank's RNG state or None)."""
    tensors = load_file(str(directory / "trainable.safetensors"))
    state = torch.load(directory / "training_state.pt", weights_only=False)
    rng_path = directory / f"rng-rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
    return tensors, state, rng
