"""Caption dropout: with probability p a sample's cached caption embedding is replaced by the cached
empty-prompt embedding, so the fine-tuned model keeps an unconditional prediction and classifier-free
guidance keeps working.

The draw for the samples of a batch is a function of (seed, batch position, rank) only: a resumed
run drops exactly the captions an uninterrupted one drops, whatever the number of loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The text part's tensors under their diffusers names; a cached text part holds a subset.
TEXT_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")


def dropped_rows(probability: float, seed: int, position: int, rank: int, batch: int) -> torch.Tensor:
    """(B,) bool: which samples of the batch at ``position`` lose their caption."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + position) * 4099 + rank) % 2**63)
    return torch.rand(batch, generator=generator) < probability


@dataclass(frozen=True)
class CaptionDropout:
    """Replaces dropped samples' text tensors by ``null_text`` (the empty prompt's text part, each
    tensor unbatched: (L, D), (L,), (D2,)). Called on a stacked batch (B, ...) in the loader."""

    probability: float
    null_text: dict[str, torch.Tensor]
    seed: int
    rank: int = 0

    def __call__(self, position: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = batch["prompt_embeds"].shape[0]
        dropped = dropped_rows(self.probability, self.seed, position, self.rank, size)
        if not dropped.any():
            return batch
        out = dict(batch)
        for key in TEXT_KEYS:
            if key not in batch:
                continue
            if batch[key].shape[1:] != self.null_text[key].shape:
                raise ValueError(
                    f"data.caption_dropout: the cached empty prompt's {key} has shape "
                    f"{tuple(self.null_text[key].shape)}, the captions' {tuple(batch[key].shape[1:])}; "
                    "run `crepa precompute` again"
                )
            mask = dropped.view(-1, *([1] * (batch[key].ndim - 1)))
            out[key] = torch.where(mask, self.null_text[key].to(batch[key].dtype), batch[key])
        return out
