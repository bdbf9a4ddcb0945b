"""Capture one block's output from any registered video transformer with forward hooks.

No diffusers code is edited. A pre-hook on the transformer records the token grid of the call and
arms the block hook; the block hook keeps that one block's video tokens and disarms, so the
recomputation that gradient checkpointing runs during backward is ignored and only one block's
output is ever held.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from crepa.align.grids import tokens_to_grid
from crepa.models.registry import ModelFamily, bind_call, detect_family


class BlockCapture:
    """Keeps the output of block ``block_index`` of the last forward as a (B, F', H', W', C) grid.

    ``detach=True`` stores a detached tensor (a teacher taken from a deeper block).
    """

    def __init__(
        self,
        transformer: nn.Module,
        block_index: int,
        family: ModelFamily | None = None,
        *,
        detach: bool = False,
    ) -> None:
        self.family = family or detect_family(transformer)
        blocks = self.family.blocks(transformer)
        if not 0 <= block_index < len(blocks):
            raise ValueError(
                f"block_index {block_index} is outside {type(transformer).__name__}'s "
                f"{len(blocks)} blocks (valid: 0..{len(blocks) - 1})"
            )
        self.block_index = block_index
        self.detach = detach
        self._transformer = transformer
        self._grid: tuple[int, int, int] | None = None
        self._armed = False
        self._tokens: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = [
            transformer.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True),
            blocks[block_index].register_forward_hook(self._on_block_output),
        ]

    def _on_transformer_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._grid = self.family.latent_grid(module, bind_call(module, args, kwargs))
        self._armed = True
        self._tokens = None

    def _on_block_output(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self._armed:  # gradient-checkpoint recomputation, or a call outside the transformer
            return
        tokens = output[0] if isinstance(output, (tuple, list)) else output
        self._tokens = tokens.detach() if self.detach else tokens
        self._armed = False

    @property
    def grid_size(self) -> tuple[int, int, int] | None:
        """(F', H', W') of the last forward call."""
        return self._grid

    def pop(self) -> torch.Tensor:
        """The captured (B, F', H', W', C) grid of the last forward; the reference is released."""
        if self._tokens is None or self._grid is None:
            raise RuntimeError(
                f"no output of block {self.block_index} was captured: run the transformer forward "
                "before asking for the alignment loss (once per forward)"
            )
        tokens, self._tokens = self._tokens, None
        return tokens_to_grid(tokens, self._grid)

    def remove(self) -> None:
        """Detach the hooks; the transformer behaves exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tokens = None
