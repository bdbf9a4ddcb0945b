"""Representation diagnostics of a run, from its run file: the model, the precomputed cache and a LoRA.

For the first ``clips`` cached clips, ``draws`` noise levels each are drawn from the run's training
distribution (seeded); the same forward calls go through the base model and, when given, the model
with the LoRA loaded. Per call, every block's adjacent-frame similarity is recorded and, when the
run has an external teacher, the aligned block's hidden states are paired with the teacher's
features of the clean clip for CKNNA (raw hidden states: the projector is not needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from crepa.config import RepVideoSection, RunConfig
from crepa.eval.cknna import cknna
from crepa.eval.layers import LayerSimilarityRecorder, block_frame_features, layer_similarity_profile
from crepa.models.conditioning import transformer_inputs
from crepa.models.loading import load_online_teacher, load_transformer, resolve_family, scheduler_alphas
from crepa.models.registry import ModelFamily
from crepa.repvideo import RepVideoGates, load_gates
from crepa.rundir import GATES_FILE, LORA_FILE
from crepa.train.preflight import open_dataset
from crepa.train.step import batch_teacher_grid, batch_text, noise_batch


@dataclass
class RunDiagnostics:
    """profiles: per label ("base", "lora"), adjacent-frame similarity per block. cknna: per label,
    CKNNA of block ``block_index`` with the teacher (empty without an external teacher)."""

    profiles: dict[str, list[float]]
    cknna: dict[str, float]
    block_index: int
    samples: int
    timesteps: list[float]
    notes: list[str] = field(default_factory=list)


def diagnostic_calls(
    config: RunConfig,
    family: ModelFamily,
    transformer: nn.Module,
    *,
    clips: int,
    draws: int,
    seed: int,
    with_teacher: bool,
    device: torch.device,
) -> list[tuple[dict[str, Any], torch.Tensor | None]]:
    """Forward calls (and the clean clip's teacher grid, or None) for the first ``clips`` cached clips."""
    dataset = open_dataset(config, family, with_teacher)
    if len(dataset) == 0:
        raise ValueError(f"{config.cache.dir}: the cache holds no clips; run `crepa precompute` first")
    dtype = next(transformer.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    alphas = scheduler_alphas(config, family)
    online_teacher = online_vae = None
    if with_teacher and config.cache.teacher_source != "cache":
        online_teacher, online_vae = load_online_teacher(config, family, device)
    samples = []
    for index in range(min(clips, len(dataset))):
        item = {
            key: value.unsqueeze(0).to(device)
            for key, value in dataset[index].items()
            if torch.is_tensor(value)
        }
        latents = item["latents"].to(dtype)
        teacher_grid = (
            batch_teacher_grid(config, family, transformer, item, online_teacher, online_vae).float()
            if with_teacher
            else None
        )
        text = batch_text(item, dtype)
        for _ in range(draws):
            noised = noise_batch(config, family, latents, generator, alphas)
            call = transformer_inputs(
                transformer, family, noised.noisy, noised.timesteps, text, frame_rate=config.data.fps or 25.0
            )
            samples.append((call, teacher_grid))
    return samples


def load_lora(transformer: nn.Module, path: str | Path) -> None:
    """Load a diffusers-format LoRA (a folder holding pytorch_lora_weights.safetensors, or the file)."""
    path = Path(path)
    if path.is_file():
        transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    elif (path / LORA_FILE).is_file():
        transformer.load_lora_adapter(str(path), weight_name=LORA_FILE, prefix="transformer")
    else:
        raise ValueError(f"--lora {path}: neither a LoRA file nor a folder holding {LORA_FILE}")


def load_repvideo_gates(
    transformer: nn.Module, path: str | Path, settings: RepVideoSection
) -> RepVideoGates | None:
    """Install RepVideo with the run's settings and the trained gates saved next to a LoRA, if any.

    path: the run's output folder (or its LoRA file); returns None when no gates were saved there.
    """
    path = Path(path)
    gates_file = (path if path.is_dir() else path.parent) / GATES_FILE
    if not gates_file.is_file():
        return None
    return load_gates(transformer, settings, load_file(str(gates_file))["gate"], gates_file)


@torch.no_grad()
def diagnose_run(
    config: RunConfig,
    *,
    lora: str | Path | None = None,
    clips: int = 8,
    draws: int = 2,
    block_index: int | None = None,
    k: int = 10,
    seed: int = 0,
    device: str = "cpu",
) -> RunDiagnostics:
    """Per-layer adjacent-frame similarity (and CKNNA of the aligned block) for the base model and the LoRA."""
    family = resolve_family(config)
    transformer = load_transformer(config, family, torch.float32).to(device).eval()
    depth = len(family.blocks(transformer))
    if block_index is None:
        block_index = (
            config.crepa.block_index if config.crepa.block_index is not None else family.default_block_index
        )
        block_index = min(block_index, depth - 1)
    if not 0 <= block_index < depth:
        raise ValueError(f"--block {block_index} is outside the model's {depth} blocks (0..{depth - 1})")
    with_teacher = config.crepa.mode != "backbone"
    notes = [] if with_teacher else ["backbone mode has no external teacher: no CKNNA"]
    samples = diagnostic_calls(
        config,
        family,
        transformer,
        clips=clips,
        draws=draws,
        seed=seed,
        with_teacher=with_teacher,
        device=torch.device(device),
    )
    labels = ["base"]
    if lora is not None:
        labels.append("lora")
    profiles: dict[str, list[float]] = {}
    scores: dict[str, float] = {}
    for label in labels:
        if label == "lora":
            load_lora(transformer, lora)
            if load_repvideo_gates(transformer, lora, config.repvideo) is not None:
                notes.append("the trained model's RepVideo gates are installed for the 'lora' profile")
        if with_teacher:
            with LayerSimilarityRecorder(transformer) as recorder:
                student, teacher = block_frame_features(transformer, block_index, samples)
            profiles[label] = recorder.profile().tolist()
            scores[label] = cknna(student, teacher, k=k)
        else:
            profiles[label] = layer_similarity_profile(transformer, (call for call, _ in samples)).tolist()
    timesteps = [float(t) for call, _ in samples for t in call["timestep"].flatten().tolist()]
    return RunDiagnostics(profiles, scores, block_index, len(samples), timesteps, notes)
