"""``crepa demo``: the embedded default run.

Until the full synthetic experiment lands, this is an end-to-end smoke of the library on a tiny
Wan transformer: a few LoRA-free fine-tuning steps with CREPA, printing what happened.
"""

from __future__ import annotations

import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from crepa import CrepaConfig, CrepaRegularizer
from crepa.cli import app
from crepa.models.tiny import tiny_transformer


@app.command()
def demo(
    steps: int = typer.Option(20, help="Optimisation steps."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run the embedded default: CREPA on a tiny model, no downloads, CPU only."""
    console = Console()
    torch.manual_seed(seed)
    transformer = tiny_transformer("wan", seed=seed)
    teacher_dim = 32
    reg = CrepaRegularizer(transformer, CrepaConfig(block_index=1, weight=0.5), teacher_dim=teacher_dim)
    optimizer = torch.optim.AdamW([*transformer.parameters(), *reg.parameters()], lr=1e-3)
    latents = torch.randn(2, 4, 5, 8, 8)  # (B, C, F', H, W)
    text = torch.randn(2, 6, 16)
    teacher = torch.randn(2, 5, 3, 3, teacher_dim)  # frozen features of the clean clip, any 2-D grid
    table = Table("step", "diffusion loss", "crepa loss", "sim_self", "score", title="crepa smoke run")
    start = time.perf_counter()
    for step in range(steps):
        noise = torch.randn_like(latents)
        sigma = torch.rand(latents.shape[0]).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = transformer(
            hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=text
        ).sample
        diffusion_loss = torch.nn.functional.mse_loss(pred, noise - latents)
        out = reg.loss(teacher, step=step)
        (diffusion_loss + out.loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            m = out.metrics
            table.add_row(
                str(step),
                f"{diffusion_loss.item():.4f}",
                f"{m['crepa/loss'].item():.4f}",
                f"{m['crepa/sim_self'].item():.4f}",
                f"{m['crepa/score'].item():.4f}",
            )
    console.print(table)
    console.print(
        f"Tiny {type(transformer).__name__}: block {reg.block_index} captured as grid "
        f"{reg.capture.grid_size}, projector {sum(p.numel() for p in reg.parameters())} parameters, "
        f"{steps} steps in {time.perf_counter() - start:.1f}s."
    )
