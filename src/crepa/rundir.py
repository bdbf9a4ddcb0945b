"""The layout of a training run's output folder (``output.dir``): every file name in it and the
naming of its checkpoints. The one place these names are spelled; it imports nothing from crepa, so
the trainer, the readers of a run (:mod:`crepa.runs`) and the evaluators all import it.

    output.dir/
        run_config.json                     the validated run file (written when the run starts)
        metrics.jsonl                       one line per logged step
        checkpoints/step-000123/            trainable.safetensors, training_state.{json,safetensors},
                                            rng-rank{r}.{json,safetensors}, ema.safetensors (ema.enabled)
        pytorch_lora_weights.safetensors    final LoRA (or transformer/ for full fine-tuning); with
                                            ema.enabled the EMA weights, the raw ones in *_raw files
        projector.safetensors               final CREPA projector
        repvideo_gates.safetensors          final RepVideo gates
        training_summary.json               written when the run ends (holds the run file too)
        validation/step-000123/             validation samples
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "training_summary.json"
METRICS_FILE = "metrics.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"
PROJECTOR_FILE = "projector.safetensors"
GATES_FILE = "repvideo_gates.safetensors"
VALIDATION_DIR = "validation"

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_TENSORS = "trainable.safetensors"
CHECKPOINT_STATE = "training_state"
CHECKPOINT_EMA = "ema.safetensors"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TRASH_PREFIX = ".trash-"


def step_name(step: int) -> str:
    """The folder name of ``step``'s checkpoint or validation samples: ``step-000123``."""
    return f"step-{step:06d}"


def side_module_file(name: str) -> str:
    """The final file of a module trained next to the transformer ("projector", "repvideo_gates")."""
    return f"{name}.safetensors"


def raw_name(name: str) -> str:
    """Where an EMA run puts the raw (not averaged) weights of final file or folder ``name``:
    ``pytorch_lora_weights_raw.safetensors``, ``transformer_raw``; the EMA takes ``name`` itself."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}_raw{dot}{suffix}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))
