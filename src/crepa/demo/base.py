"""The demo's base video model: a tiny ``CogVideoXTransformer3DModel`` pre-trained on the generic
split by crepa's own precompute and trainer (full fine-tuning from random weights, no alignment).

CogVideoX because its text is as short as its config says (16 tokens here; Wan pads every
prompt to 512, which triples the step time of a model this small). The pipeline around it is
the tiny CogVideoX pipeline of :mod:`crepa.models.tiny_pipelines` (T5 text encoder, word-level
tokenizer, the real DDIM scheduler with zero terminal SNR) with the demo's PCA autoencoder as VAE.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch

from crepa.demo.artefacts import STAMP_FILE, build_once
from crepa.demo.latent import fit_pca_autoencoder
from crepa.demo.world import RenderedSplit, WorldSettings
from crepa.experiment.runfiles import write_run_file
from crepa.models.tiny_pipelines import TINY_PIPELINES
from crepa.precompute import precompute
from crepa.rundir import CHECKPOINTS_DIR, TRANSFORMER_DIR
from crepa.train.recipe import train

PIPELINE_DIR, TRAINING_DIR = "pipeline", "training"


@dataclass(frozen=True)
class BaseSettings:
    """Latent space, transformer size (patch 1: one token per latent pixel) and pre-training."""

    latent_channels: int = 48
    heads: int = 4
    head_dim: int = 24
    layers: int = 4
    time_embed_dim: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0


def build_initial_pipeline(
    directory: Path, generic: RenderedSplit, settings: BaseSettings, upstream: dict
) -> bool:
    """Save the untrained pipeline (random transformer, PCA VAE fitted to the generic clips) unless it
    is there; returns reused."""
    world = generic.settings

    def build(staging: Path) -> None:
        components = TINY_PIPELINES["cogvideox"]()
        torch.manual_seed(settings.seed)
        latent_side = world.size // 8
        components["transformer"] = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=settings.heads,
            attention_head_dim=settings.head_dim,
            in_channels=settings.latent_channels,
            out_channels=settings.latent_channels,
            time_embed_dim=settings.time_embed_dim,
            text_embed_dim=components["text_encoder"].config.d_model,
            num_layers=settings.layers,
            sample_width=latent_side,
            sample_height=latent_side,
            sample_frames=world.num_frames,
            patch_size=1,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
        )
        components["vae"] = fit_pca_autoencoder(generic.clips, settings.latent_channels)
        diffusers.CogVideoXPipeline(**components).save_pretrained(staging)

    return build_once(directory, {"initial_pipeline": asdict(settings), **upstream}, build)


def data_section(world: WorldSettings, source: Path) -> dict:
    """The run file's [data] section for a split of the world (every frame, native size)."""
    return {"source": source, "resolutions": [[world.size, world.size]], "num_frames": [world.num_frames]}


def build_base_model(
    directory: Path,
    initial_pipeline: Path,
    generic_dir: Path,
    cache_dir: Path,
    world: WorldSettings,
    settings: BaseSettings,
    upstream: dict,
    progress: bool = True,
) -> bool:
    """Pre-train the transformer with ``crepa precompute`` + ``crepa train`` on the generic split and
    save the base pipeline in ``directory/pipeline`` (the run in ``directory/training``); returns reused."""

    def build(staging: Path) -> None:
        training = staging / TRAINING_DIR
        config = write_run_file(
            training / "run.toml",
            {
                "model": {"pretrained": initial_pipeline, "gradient_checkpointing": False},
                "data": data_section(world, generic_dir),
                "cache": {"dir": cache_dir},
                "crepa": {"enabled": False},
                "lora": {"enabled": False},
                "optim": {
                    "lr": settings.lr,
                    "lr_scheduler": "cosine",
                    "warmup_steps": settings.warmup_steps,
                    "weight_decay": 0.0,
                },
                "train": {
                    "max_steps": settings.steps,
                    "batch_size": settings.batch_size,
                    "seed": settings.seed,
                    "checkpoint_every": settings.steps,
                    "keep_checkpoints": 1,
                },
                "logging": {"every": 10, "tensorboard": False},
                "output": {"dir": training},
            },
            "Pre-training of the demo's base model on the generic split (full fine-tuning, no alignment).",
        )
        precompute(config, progress=progress)
        train(config, progress=progress, announce=False)  # its full fine-tuning is not the demo's LoRA
        pipeline = staging / PIPELINE_DIR
        skipped = shutil.ignore_patterns("transformer", STAMP_FILE, ".*")
        shutil.copytree(initial_pipeline, pipeline, ignore=skipped)
        (training / TRANSFORMER_DIR).replace(pipeline / "transformer")
        shutil.rmtree(training / CHECKPOINTS_DIR)  # optimiser state: not needed once the model is published

    return build_once(directory, {"base": asdict(settings), **upstream}, build)
