"""Representation diagnostics of a video transformer (base or with a LoRA loaded).

- RepVideo's analysis: per block, the cosine similarity between the hidden states of adjacent
  latent frames (token by token at the same spatial position, averaged).
- CKNNA between one block's hidden states (raw or through the trained projector) and the
  teacher's features of the clean clip, one sample per (clip, latent frame, noise level).

Inputs are forward calls: keyword dicts for ``transformer(**call)`` (e.g. built with
``crepa.models.conditioning.transformer_inputs`` from noised latents). The caller chooses the
clips and noise levels; nothing here depends on a model family beyond the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crepa.align.grids import tokens_to_grid
from crepa.eval.cknna import cknna
from crepa.models import BlockCapture, bind_call, detect_family
from crepa.regularizer import match_teacher_frames


def adjacent_frame_similarity(grid: torch.Tensor) -> torch.Tensor:
    """Cosine of each token with the token at the same position one latent frame later, averaged
    over positions: (B, F', H', W', C) -> (B, F' - 1)."""
    if grid.ndim != 5 or grid.shape[1] < 2:
        raise ValueError(
            f"adjacent-frame similarity needs a token grid (B, F', H', W', C) with F' >= 2, got {tuple(grid.shape)}"
        )
    return F.cosine_similarity(grid[:, 1:].float(), grid[:, :-1].float(), dim=-1).mean(dim=(2, 3))


class LayerSimilarityRecorder:
    """Forward hooks on every block that accumulate its adjacent-frame similarity, call after call.

    Each block output is reduced inside its hook, so no block output is kept. Use as a context
    manager around any forward calls (other hooks, such as a :class:`BlockCapture`, may run in the
    same forwards); :meth:`profile` gives the per-block means.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.family = detect_family(transformer)
        blocks = self.family.blocks(transformer)
        self.totals = torch.zeros(len(blocks), dtype=torch.float64)
        self.counts = torch.zeros(len(blocks), dtype=torch.float64)
        self._grid: tuple[int, int, int] | None = None
        self._handles = [transformer.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        self._handles += [block.register_forward_hook(self._on_block(i)) for i, block in enumerate(blocks)]

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._grid = self.family.latent_grid(module, bind_call(module, args, kwargs))

    def _on_block(self, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            similarity = adjacent_frame_similarity(tokens_to_grid(tokens.detach(), self._grid)).double().cpu()
            self.totals[index] += similarity.sum()
            self.counts[index] += similarity.numel()

        return hook

    def profile(self) -> torch.Tensor:
        """Mean adjacent-frame similarity per block over everything recorded: float64 (num_blocks,)."""
        if not self.counts.all():
            raise ValueError("no forward call reached every block: run at least one call")
        return self.totals / self.counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerSimilarityRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def layer_similarity_profile(transformer: nn.Module, calls: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Mean adjacent-frame similarity of every block's output over all ``calls``: float64 (num_blocks,)."""
    with LayerSimilarityRecorder(transformer) as recorder:
        for call in calls:
            transformer(**call)
    return recorder.profile()


@torch.no_grad()
def block_frame_features(
    transformer: nn.Module,
    block_index: int,
    samples: Iterable[tuple[Mapping[str, Any], torch.Tensor]],
    projector: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One feature per (clip, latent frame) from a block and from the teacher, paired row by row.

    samples: (forward call, teacher grid (B, F_t, h, w, D) of the same clips' clean frames); the
    teacher's latent frames are averaged in groups when the student patches time. The block's
    tokens (optionally through ``projector``) and the teacher's patches are averaged over space.
    Returns (N, C) block features and (N, D) teacher features, N = sum of B * F'.
    """
    capture = BlockCapture(transformer, block_index, detach=True)
    student_rows, teacher_rows = [], []
    try:
        for call, teacher_grid in samples:
            transformer(**call)
            tokens = capture.pop()  # (B, F', H', W', C)
            if projector is not None:
                weight = next(projector.parameters(), None)
                tokens = projector(tokens if weight is None else tokens.to(weight.dtype))
            if teacher_grid.ndim != 5 or teacher_grid.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"teacher grid must be (B, F', h, w, D) for the call's batch of {tokens.shape[0]}, "
                    f"got {tuple(teacher_grid.shape)}"
                )
            teacher = match_teacher_frames(teacher_grid.to(tokens.device), tokens.shape[1])
            student_rows.append(tokens.float().mean(dim=(2, 3)).flatten(0, 1).cpu())
            teacher_rows.append(teacher.float().mean(dim=(2, 3)).flatten(0, 1).cpu())
    finally:
        capture.remove()
    if not student_rows:
        raise ValueError("no samples were given")
    return torch.cat(student_rows), torch.cat(teacher_rows)


def block_cknna(
    transformer: nn.Module,
    block_index: int,
    samples: Iterable[tuple[Mapping[str, Any], torch.Tensor]],
    projector: nn.Module | None = None,
    k: int = 10,
) -> float:
    """CKNNA between block ``block_index``'s features and the teacher's (see :func:`block_frame_features`)."""
    student, teacher = block_frame_features(transformer, block_index, samples, projector)
    return cknna(student, teacher, k=k)
