"""Training input from the cache: :class:`CachedDataset`.

Batch it by ``dataset.buckets`` (e.g. with :class:`crepa.train.batches.BucketedBatchOrder`) so a
batch never mixes shapes; items of one bucket stack with ``torch.stack`` / ``default_collate``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from crepa.cache.manifest import SHARDS_DIR, CacheEntry, Manifest
from crepa.cache.shards import DamagedShardError, ShardReader
from crepa.data.dataset import VideoSample, load_sample
from crepa.io.video import probe_clip


class CacheDamagedError(RuntimeError):
    """A cached part cannot be used (damaged shard, changed video); the message says how to fix it."""


class CachedDataset(Dataset):
    """Precomputed samples: item i is a dict of tensors (float16 as stored, masks as encoded).

    - "latents": (C, F, h, w) normalised latents in the VAE layout;
    - the text part under its diffusers names: "prompt_embeds" (L, D), plus "prompt_attention_mask"
      (L,) and / or "pooled_prompt_embeds" (D2,) for the families that use them;
    - "teacher": (F', H', W', D) teacher grid, when the cache holds one and ``teacher`` is true;
    - "frames": (T, 3, H, W) float32 clean frames in [0, 1] decoded from the video, when ``frames``
      is true (the online "pixels" teacher mode);
    - "index": the item's position.

    ``verify`` checks every part against its checksum as it is read; a damaged part raises
    :class:`CacheDamagedError` naming the shard (re-running precompute recomputes it).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        teacher: bool | None = None,
        frames: bool = False,
        verify: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = Manifest.read(self.cache_dir)
        self.reader = ShardReader(self.cache_dir / SHARDS_DIR)
        if teacher and self.manifest.teacher is None:
            raise ValueError(
                f"{self.cache_dir}: the cache holds no teacher grids (precomputed with another teacher_source "
                "or without an external teacher); use teacher_source 'pixels' or 'vae', or precompute again"
            )
        self.teacher = self.manifest.teacher is not None if teacher is None else teacher
        self.frames = frames
        self.verify = verify

    def __len__(self) -> int:
        return len(self.manifest.entries)

    @property
    def entries(self) -> list[CacheEntry]:
        return self.manifest.entries

    @property
    def buckets(self) -> list[tuple[int, int, int]]:
        """Per item, its (T, H, W) bucket: items with equal buckets have equal tensor shapes."""
        return [entry.bucket for entry in self.manifest.entries]

    @property
    def teacher_dim(self) -> int | None:
        """Width D of the cached teacher features (None without teacher grids)."""
        return None if self.manifest.teacher is None else int(self.manifest.teacher["dim"])

    def _part(self, key: str) -> dict[str, torch.Tensor]:
        location = self.manifest.parts[key]
        try:
            return self.reader.read(location, verify=self.verify)
        except DamagedShardError as error:
            raise CacheDamagedError(
                f"{error}. Run `crepa precompute CONFIG` again: it detects the damage and recomputes the part"
            ) from None

    def null_text(self) -> dict[str, torch.Tensor]:
        """The text part of the empty prompt (for caption dropout)."""
        if self.manifest.null_text is None:
            raise ValueError(f"{self.cache_dir}: the cache holds no empty-prompt embedding")
        return self._part(self.manifest.null_text)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.manifest.entries[index]
        item: dict[str, Any] = {"index": index}
        item |= self._part(entry.parts["latents"])
        item |= self._part(entry.parts["text"])
        if self.teacher:
            item |= self._part(entry.parts["teacher"])
        if self.frames:
            item["frames"] = self.load_frames(entry)
        return item

    def load_frames(self, entry: CacheEntry) -> torch.Tensor:
        """Clean frames (T, 3, H, W) in [0, 1] of ``entry``, decoded exactly as precompute decoded them."""
        stat = os.stat(entry.video)
        if (stat.st_size, stat.st_mtime_ns) != (entry.file_size, entry.file_mtime_ns):
            raise CacheDamagedError(
                f"{entry.video} changed since it was precomputed; run `crepa precompute CONFIG` again"
            )
        sample = VideoSample(
            Path(entry.video), entry.caption, probe_clip(entry.video), entry.frame_indices, entry.size
        )
        return load_sample(sample).frames
