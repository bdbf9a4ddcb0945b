"""The experiment: fine-tune the base model with LoRA on the attribute split three ways (no
alignment, REPA*, CREPA), same steps, for each seed, through ``crepa precompute`` and ``crepa train``.

Each run is a run file ``runs/<variant>-seed<k>/run.toml`` (reproducible with ``crepa train``) and
its output folder: ``metrics.jsonl``, ``training_summary.json``, the LoRA in diffusers format and,
for the aligned variants, ``projector.safetensors``. All runs share one precompute cache, filled
with the CREPA run file: it holds everything the other variants read (latents, captions, teacher grids).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crepa.config import RunConfig, load_config
from crepa.demo.base import data_section
from crepa.demo.runfile import write_run_file
from crepa.demo.world import WorldSettings
from crepa.precompute import PrecomputeSummary, precompute
from crepa.train.recipe import train

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"enabled": False},
    "repa": {"mode": "repa"},
    "crepa": {"mode": "crepa", "distance": 1, "tau": 1.0},
}
VARIANT_LABELS = {"none": "no alignment", "repa": "REPA*", "crepa": "CREPA"}


@dataclass(frozen=True)
class FinetuneSettings:
    """LoRA fine-tuning shared by every variant; alignment settings shared by REPA* and CREPA."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 8
    # The attention projections (crepa's default for CogVideoX) and the feed-forward layers.
    lora_targets: str = r"^transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"
    block_index: int = 1
    weight: float = 0.5
    projector_hidden_dim: int = 128


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: its variant, seed, run file and output folder."""

    variant: str
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def run_file(self) -> Path:
        return self.directory / "run.toml"


def run_sections(
    pipeline: Path,
    source: Path,
    cache_dir: Path,
    teacher: Path,
    world: WorldSettings,
    settings: FinetuneSettings,
    variant: str,
    seed: int,
    output: Path,
) -> dict[str, dict[str, Any]]:
    """The run file of ``variant`` at ``seed`` (see :data:`VARIANTS`)."""
    alignment = {
        "block_index": settings.block_index,
        "weight": settings.weight,
        "projector_hidden_dim": settings.projector_hidden_dim,
        **VARIANTS[variant],
    }
    return {
        "model": {"pretrained": pipeline, "gradient_checkpointing": False},
        "data": data_section(world, source),
        "cache": {"dir": cache_dir},
        "teacher": {"name": teacher},
        "crepa": alignment,
        "lora": {"rank": settings.rank, "alpha": settings.rank, "targets": settings.lora_targets},
        "optim": {"lr": settings.lr, "weight_decay": 0.0},
        "train": {
            "max_steps": settings.steps,
            "batch_size": settings.batch_size,
            "seed": seed,
            "checkpoint_every": settings.steps,
            "keep_checkpoints": 1,
        },
        "logging": {"every": 5, "tensorboard": False},
        "output": {"dir": output},
    }


def prepare_runs(
    root: Path,
    pipeline: Path,
    attribute_dir: Path,
    cache_dir: Path,
    teacher: Path,
    world: WorldSettings,
    settings: FinetuneSettings,
    seeds: int,
) -> list[tuple[Run, RunConfig]]:
    """Write the run file of every (variant, seed) under ``root`` (previous outputs are removed)."""
    runs = []
    for variant in VARIANTS:
        for seed in range(seeds):
            run = Run(variant, seed, root / f"{variant}-seed{seed}")
            shutil.rmtree(run.directory, ignore_errors=True)
            sections = run_sections(
                pipeline, attribute_dir, cache_dir, teacher, world, settings, variant, seed, run.directory
            )
            comment = (
                f"crepa demo: {VARIANT_LABELS[variant]}, seed {seed}, LoRA fine-tuning of the base model on "
                "the attribute split.\nReproduce with: crepa precompute run.toml && crepa train run.toml"
            )
            runs.append((run, write_run_file(run.run_file, sections, comment)))
    return runs


def precompute_heldout(
    root: Path, pipeline: Path, heldout_dir: Path, cache_dir: Path, teacher: Path, world: WorldSettings
) -> tuple[RunConfig, PrecomputeSummary]:
    """Latents, captions and teacher grids of the held-out clips (for CKNNA), via a precompute-only run file."""
    sections = run_sections(
        pipeline, heldout_dir, cache_dir, teacher, world, FinetuneSettings(), "crepa", 0, root / "unused"
    )
    del sections["output"]
    config = write_run_file(
        root / "heldout.toml", sections, "crepa demo: the held-out clips, precompute only."
    )
    return config, precompute(config, progress=False)


def train_run(run_file: Path) -> str:
    """``crepa train RUN_FILE`` without progress bars; returns the run file's folder name. A top-level
    function, so worker processes can run it."""
    train(load_config(run_file), progress=False)
    return run_file.parent.name
