"""Training checkpoints: written to a temporary directory and renamed into place, last K kept.

A checkpoint ``step-000123/`` holds ``trainable.safetensors`` (trainable transformer parameters —
LoRA or all — plus the projector and any RepVideo gates, by name), ``training_state`` (optimiser,
LR scheduler, alignment schedule, step, data position, the run file's settings) and ``rng-rank{r}``
per process. Nothing is pickled: each state is a JSON document (``.json``) whose tensors live in a
safetensors file of the same stem, so loading a checkpoint someone else wrote can never run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crepa.config import ConfigError
from crepa.rundir import (
    CHECKPOINT_EMA,
    CHECKPOINT_STATE,
    CHECKPOINT_TENSORS,
    TRASH_PREFIX,
    checkpoint_dirs,
    step_name,
)
from crepa.runs import RunDirectoryError, checkpoint_dir
from crepa.train.parallel import copy_full_into, full_tensor


# ---------------------------------------------------------------- pickle-free state files
# torch.save would pickle; safetensors holds tensors only. The state of a run (optimiser, schedulers,
# RNGs) is nested dicts / lists / tuples of numbers and tensors, so it is written as JSON with each
# tensor replaced by a reference into a safetensors file, and tuples / non-string keys / numpy arrays
# tagged so that the loaded structure equals the saved one.
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").clone().contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {
            "__items__": [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()
            ]
        }
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {key: _decode(item, tensors) for key, item in value.items()}


def save_state(directory: Path, stem: str, state: Any) -> None:
    """Write ``state`` as ``<stem>.json`` + ``<stem>.safetensors`` (its tensors) in ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, tensors, stem)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(document), encoding="utf-8")


def load_state(directory: Path, stem: str) -> Any:
    """The inverse of :func:`save_state`; raises ``ValueError`` for a damaged or foreign file."""
    try:
        document = json.loads((directory / f"{stem}.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / f"{stem}.safetensors"))
        return _decode(document, tensors)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{directory / stem}: unreadable checkpoint state ({error})") from None


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """``--resume latest`` -> the newest checkpoint under ``root``; ``auto`` -> the same, or None (a
    fresh start) when there is none yet; a path -> that checkpoint; a bare name that is no folder here
    (``step-000500``, or ``500``) -> that checkpoint under ``root``; no ``--resume`` -> None, refused
    when ``root`` already holds checkpoints. Raises :class:`ConfigError`."""
    if resume is None:
        found = checkpoint_dirs(root)
        if found:  # a fresh start would prune them as its own checkpoints arrive
            raise ConfigError(
                f"{root} holds checkpoints of an earlier run (up to {found[-1].name}); a fresh start would "
                "delete them. Resume with --resume latest (or --resume auto), or set output.dir to another "
                "folder (or remove this one) to start from step 0"
            )
        return None
    if resume in ("latest", "auto"):
        found = checkpoint_dirs(root)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise ConfigError(
            f"--resume latest: {root} holds no checkpoint yet, so there is nothing to resume. Drop --resume "
            "to start from step 0, use --resume auto to resume only when a checkpoint exists, or check "
            "output.dir"
        )
    path = Path(resume)
    if not path.is_dir():
        if len(path.parts) != 1:
            raise ConfigError(
                f"--resume {resume}: no such directory; give a checkpoint directory, a checkpoint name "
                "such as step-000500, 'latest' or 'auto'"
            )
        try:  # a bare name or step number: a checkpoint of this run, as `crepa sample --checkpoint` reads it
            path = checkpoint_dir(root.parent, resume)
        except RunDirectoryError as error:
            raise ConfigError(
                f"--resume {resume}: no such directory, and {error}; give a checkpoint name, a checkpoint "
                "directory, 'latest' or 'auto'"
            ) from None
    if not (path / f"{CHECKPOINT_STATE}.json").is_file():
        legacy = (
            " (written by an older crepa that pickled its state: not loaded)"
            if any(path.glob("*.pt"))
            else ""
        )
        raise ConfigError(
            f"--resume {resume}: not a crepa checkpoint, no {CHECKPOINT_STATE}.json in it{legacy}; give a "
            f"directory such as {root}/step-000500, 'latest' or 'auto'"
        )
    return path


# Run-file settings that fix the shapes (or meaning) of what a checkpoint holds.
RESUME_SETTINGS = (
    ("lora", "enabled", "LoRA enabled"),
    ("lora", "rank", "LoRA rank"),
    ("lora", "targets", "LoRA targets"),
    ("crepa", "enabled", "alignment enabled"),
    ("crepa", "mode", "alignment mode"),
    ("crepa", "projector", "projector"),
    ("crepa", "projector_hidden_dim", "projector hidden width"),
    ("repvideo", "enabled", "RepVideo enabled"),
    ("repvideo", "window", "RepVideo window"),
    ("teacher", "name", "teacher"),
    ("lora", "variant", "LoRA variant"),
    ("ema", "enabled", "EMA enabled"),
)


def check_resume_settings(checkpoint: Path, config: Any) -> None:
    """Compare the run-file settings stored in ``checkpoint`` with ``config`` (a RunConfig), reading no
    tensor; raise :class:`ConfigError` naming each difference ("checkpoint has LoRA rank 2, run file
    asks for 4")."""
    try:
        saved = json.loads((checkpoint / f"{CHECKPOINT_STATE}.json").read_text(encoding="utf-8")).get(
            "config"
        )
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"--resume {checkpoint}: unreadable {CHECKPOINT_STATE}.json ({error})") from None
    if not isinstance(saved, dict):
        return
    problems = []
    for section, key, label in RESUME_SETTINGS:
        if section not in saved or key not in saved[section]:
            continue
        current = json.loads(getattr(config, section).model_dump_json())[key]
        if saved[section][key] != current:
            problems.append(
                f"{section}.{key}: checkpoint has {label} {saved[section][key]!r}, run file asks for {current!r}"
            )
    if problems:
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint was written with other settings\n  "
            + "\n  ".join(problems)
            + "\n  set them back to resume, or start a new run in another output.dir"
        )


def trainable_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Trainable parameters of each module, keyed "<module>.<parameter name>" (the checkpoint's names)."""
    return {
        f"{prefix}.{name}": param
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Trainable parameters of each module, keyed "<module>.<parameter name>", as whole tensors
    (gathered from the shards under FSDP: every rank must call it)."""
    return {
        name: full_tensor(param.detach()).to("cpu").contiguous()
        for name, param in trainable_parameters(modules).items()
    }


def load_trainable_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back in place; every trainable parameter must be present with
    its shape (else :class:`ConfigError`, before any parameter is changed)."""
    wanted = trainable_parameters(modules)
    missing = [key for key in wanted if key not in tensors]
    mismatched = [
        f"{key}: checkpoint {tuple(tensors[key].shape)}, run {tuple(param.shape)}"
        for key, param in wanted.items()
        if key in tensors and tensors[key].shape != param.shape
    ]
    if missing or mismatched:
        listed = [f"missing {key}" for key in missing[:5]] + mismatched[:5]
        raise ConfigError(
            "--resume: the checkpoint's trainable tensors do not fit this run (other LoRA / projector / model "
            "settings?)\n  " + "\n  ".join(listed)
        )
    for key, param in wanted.items():
        copy_full_into(param, tensors[key])


def rng_state() -> dict[str, Any]:
    """This process's random states; on a GPU only its own device's (each rank has its checkpoint
    file), so a run resumes on a machine or slot with another number of visible GPUs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def staging_dir(root: Path, step: int) -> Path:
    """The temporary directory a checkpoint of ``step`` is written into before the rename."""
    return root / f".tmp-{step_name(step)}"


def write_checkpoint_files(
    directory: Path,
    tensors: dict[str, torch.Tensor] | None,
    state: dict[str, Any] | None,
    rank: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write this process's part of a checkpoint into the staging ``directory`` (rank 0 writes the
    model and, with ``ema``, the EMA weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if tensors is not None:
            save_file(tensors, str(directory / CHECKPOINT_TENSORS))
        if ema is not None:
            save_file(ema, str(directory / CHECKPOINT_EMA))
        if state is not None:
            save_state(directory, CHECKPOINT_STATE, state)
        save_state(directory, f"rng-rank{rank}", rng_state())
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)  # a full disk leaves no half checkpoint behind
        raise


def publish_checkpoint(root: Path, step: int, keep: int) -> Path:
    """Rename the staging directory into place (atomic) and delete all but the newest ``keep``.

    A checkpoint to delete is first renamed to a trash name (``.trash-step-...``), so a kill during
    the deletion never leaves a half-deleted checkpoint under a name ``--resume`` would pick; trash
    and staging left by a killed run are removed here."""
    final = root / step_name(step)
    staged = staging_dir(root, step)
    try:
        for path in staged.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            _discard(final)
        os.replace(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # no half-published checkpoint left behind
        raise
    for old in checkpoint_dirs(root)[:-keep]:
        _discard(old)
    for leftover in root.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _discard(checkpoint: Path) -> None:
    trash = checkpoint.with_name(f"{TRASH_PREFIX}{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_checkpoint(
    directory: Path, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """(trainable tensors, training state, this rank's RNG state or None)."""
    tensors = load_file(str(directory / CHECKPOINT_TENSORS))
    state = load_state(directory, CHECKPOINT_STATE)
    rng = load_state(directory, f"rng-rank{rank}") if (directory / f"rng-rank{rank}.json").is_file() else None
    return tensors, state, rng


def read_ema(directory: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint written with ``ema.enabled`` (else :class:`ConfigError`)."""
    path = directory / CHECKPOINT_EMA
    if not path.is_file():
        raise ConfigError(
            f"--resume {directory}: the checkpoint holds no EMA weights ({CHECKPOINT_EMA}); resume with "
            "ema.enabled = false, or start a new run in another output.dir"
        )
    return load_file(str(path))
