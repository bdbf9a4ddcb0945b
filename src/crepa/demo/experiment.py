"""The demo's experiment, run by ``crepa experiment``'s code: the one run file every variant starts
from (LoRA fine-tuning of the base model on the attribute split, alignment on block ``block_index``),
and the demo's evaluator (crepa eval metrics with the attribute classifier as extractor, plus CKNNA of
the aligned block against the teacher on the held-out clips).

The variants are ``crepa experiment``'s built-in none / repa / crepa: each run is a run file
``runs/<variant>-seed<k>/run.toml`` (reproducible with ``crepa train``) and its output folder. All runs
share one precompute cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import crepa.demo.latent  # noqa: F401  (the base pipeline's VAE class, loaded by name in every process)
from crepa.config import RunConfig
from crepa.demo.base import data_section
from crepa.demo.evaluate import SamplingSettings, evaluate_folder, heldout_representations, world_entries
from crepa.demo.extractor import WorldReader
from crepa.demo.verdict import METRICS
from crepa.demo.world import ClipSpec, WorldSettings
from crepa.eval.videos import SAMPLES_MANIFEST, read_manifest
from crepa.experiment.runfiles import write_run_file
from crepa.experiment.runner import PER_CLIP_VALUES, LoadedModel, ModelJob
from crepa.experiment.verdict import MetricSpec
from crepa.precompute import PrecomputeSummary, precompute

STAMP_FILE = "demo-stamp.json"


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


def run_sections(
    pipeline: Path,
    source: Path,
    cache_dir: Path,
    teacher: Path,
    world: WorldSettings,
    settings: FinetuneSettings,
    sampling: SamplingSettings,
    output: Path,
) -> dict[str, dict[str, Any]]:
    """The run file (CREPA: own frame plus neighbours at distance 1, tau 1); its ``[validation]``
    section (never run during training) holds the sampling settings of the evaluation."""
    return {
        "model": {"pretrained": pipeline, "gradient_checkpointing": False},
        "data": data_section(world, source),
        "cache": {"dir": cache_dir},
        "teacher": {"name": teacher},
        "crepa": {
            "block_index": settings.block_index,
            "weight": settings.weight,
            "projector_hidden_dim": settings.projector_hidden_dim,
            "mode": "crepa",
            "distance": 1,
            "tau": 1.0,
        },
        "lora": {"rank": settings.rank, "alpha": settings.rank, "targets": settings.lora_targets},
        "optim": {"lr": settings.lr, "weight_decay": 0.0},
        "train": {
            "max_steps": settings.steps,
            "batch_size": settings.batch_size,
            "checkpoint_every": settings.steps,
            "keep_checkpoints": 1,
        },
        "logging": {"every": 5, "tensorboard": False},
        # No classifier-free guidance: training never drops captions.
        "validation": {
            "every": 0,
            "num_frames": world.num_frames,
            "height": world.size,
            "width": world.size,
            "inference_steps": sampling.inference_steps,
            "guidance_scale": 1.0,
            "fps": sampling.fps,
        },
        "output": {"dir": output},
    }


def write_experiment_file(path: Path, sections: dict[str, dict[str, Any]]) -> RunConfig:
    comment = (
        "crepa demo: LoRA fine-tuning of the base model on the attribute split; crepa experiment makes the\n"
        "no alignment / REPA* / CREPA variants of it. Reproduce with:\n"
        "crepa experiment experiment.toml --variants none,repa,crepa --prompts ... --reference world/heldout"
    )
    return write_run_file(path, sections, comment)


def precompute_heldout(
    path: Path, sections: dict[str, dict[str, Any]]
) -> tuple[RunConfig, PrecomputeSummary]:
    """Latents, captions and teacher grids of the held-out clips (for CKNNA and the VAE reconstructions),
    via a precompute-only run file at ``path``."""
    sections = {key: value for key, value in sections.items() if key != "output"}
    config = write_run_file(path, sections, "crepa demo: the held-out clips, precompute only.")
    return config, precompute(config, progress=False)


@dataclass(frozen=True)
class DemoEvaluator:
    """crepa eval's subject consistency, flicker, warping error, motion and Frechet distance, with the
    attribute classifier (trained on the world's ground truth, not the training teacher) as feature
    extractor, and CKNNA between block ``block_index`` (no projector) and the teacher's patch features of
    the held-out clips; the world-aware metrics of :func:`crepa.demo.evaluate.world_metrics` against
    the caption of each clip (``specs``: the held-out clip specs, found by caption); and every block's
    adjacent-frame similarity on the held-out clips (``layer_similarity``, for the report's figure)."""

    extractor_dir: Path
    heldout_dir: Path
    heldout_cache: Path
    block_index: int
    specs: tuple[ClipSpec, ...] = ()

    def metrics(self, with_reference: bool) -> tuple[MetricSpec, ...]:
        return METRICS

    def describe(self) -> dict[str, Any]:
        stamp = json.loads((self.extractor_dir / STAMP_FILE).read_text(encoding="utf-8"))
        return {
            "evaluator": "crepa demo",
            "values": PER_CLIP_VALUES,
            **asdict(self),
            "extractor_digest": stamp.get("digest"),
        }

    def __call__(self, job: ModelJob, model: LoadedModel) -> dict[str, dict[str, Any]]:
        reader = WorldReader.load(self.extractor_dir)
        metrics = evaluate_folder(job.samples_dir, job.eval_dir, reader.features(), self.heldout_dir)
        clips = read_manifest(job.samples_dir / SAMPLES_MANIFEST)
        by_caption = {spec.caption: spec for spec in self.specs}
        frames = np.stack([clip.read()[0] for clip in clips])
        metrics.update(world_entries(reader, frames, [by_caption[clip.caption] for clip in clips]))
        cknna, profile = heldout_representations(model.pipeline(), self.heldout_cache, self.block_index)
        metrics["cknna"] = {"value": cknna}
        metrics["layer_similarity"] = {"per_block": profile}
        return metrics
