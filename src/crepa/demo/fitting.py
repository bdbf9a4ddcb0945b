"""The one training loop of the demo's small helper networks (teacher, evaluation classifiers): AdamW
with a one-cycle learning-rate schedule and a progress bar showing the loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm


def fit(
    parameters: Iterable[torch.nn.Parameter],
    batch_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    description: str,
    progress: bool = True,
    weight_decay: float = 0.01,
) -> None:
    """``steps`` AdamW steps on ``batch_loss()`` (a fresh batch's scalar loss each call), the learning
    rate following ``OneCycleLR`` with peak ``lr``. The loss is read back (a host sync) for the bar:
    these loops run on the CPU."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    bar = tqdm(range(steps), desc=description, unit="step", disable=not progress)
    for _ in bar:
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
