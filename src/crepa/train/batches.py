"""Deterministic, resumable batch order over a bucketed dataset.

Every batch holds samples of one bucket (equal tensor shapes). The order of an epoch is a function
of (seed, epoch) only, so a run resumed at batch position p sees exactly the batches an
uninterrupted run would have seen from p on. Under data parallelism rank r takes every world-th
batch, and every rank gets the same number of batches per epoch.

:func:`batch_loader` reads those batches through a ``torch.utils.data.DataLoader``: workers read,
verify and stack batches ahead of the step, and since item p *is* the batch at position p, the
order does not depend on the number of workers (exact resume holds with any ``num_workers``).
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from crepa.train.caption_dropout import CaptionDropout


class BucketedBatchOrder:
    """Batches of sample indices. ``buckets[i]`` is sample i's bucket key (e.g. (T, H, W));
    ``repeats[i]`` (default 1) how many times sample i appears in an epoch (a source's repeats)."""

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        repeats: Sequence[int] | None = None,
    ) -> None:
        if not buckets:
            raise ValueError("the dataset is empty: nothing to train on (check the cache / data.source)")
        # an epoch's draws: sample i listed repeats[i] times (all ones: the samples themselves)
        counts = repeats if repeats is not None else [1] * len(buckets)
        self.draws = [index for index, count in enumerate(counts) for _ in range(count)]
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.per_epoch = len(self.epoch_batches(0))
        if self.per_epoch == 0:
            raise ValueError(
                f"no bucket holds train.batch_size={batch_size} x {world_size} process(es) samples; "
                "lower train.batch_size or add clips"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (incomplete batches are dropped)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = [self.draws[i] for i in torch.randperm(len(self.draws), generator=generator).tolist()]
        grouped: dict[Hashable, list[int]] = defaultdict(list)
        for index in order:
            grouped[self.buckets[index]].append(index)
        batches = [
            members[start : start + self.batch_size]
            for members in grouped.values()
            for start in range(0, len(members) - self.batch_size + 1, self.batch_size)
        ]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        usable = len(shuffled) - len(shuffled) % self.world_size
        return shuffled[self.rank : usable : self.world_size]

    def batch_at(self, position: int) -> list[int]:
        """This rank's batch at ``position`` (counted over all epochs)."""
        epoch, offset = divmod(position, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        return self._epoch[1][offset]

    def iterate(self, start: int = 0) -> Iterator[list[int]]:
        """Endless batches from position ``start`` (batches this rank already consumed)."""
        return map(self.batch_at, itertools.count(start))


class PositionedBatches(Dataset):
    """Item p: the batch at position p of ``order``, its samples' tensors stacked (B, ...)."""

    def __init__(
        self, samples: Dataset, order: BucketedBatchOrder, caption_dropout: CaptionDropout | None = None
    ) -> None:
        self.samples = samples
        self.order = order
        self.caption_dropout = caption_dropout

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        items = [self.samples[i] for i in self.order.batch_at(position)]
        batch = {
            key: torch.stack([item[key] for item in items])
            for key, value in items[0].items()
            if isinstance(value, torch.Tensor)
        }
        return batch if self.caption_dropout is None else self.caption_dropout(position, batch)


def default_workers(processes_per_machine: int) -> int:
    """Loader workers per training process: the cores left per process after the main one, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // max(1, processes_per_machine) - 1))


def batch_loader(
    samples: Dataset,
    order: BucketedBatchOrder,
    start: int,
    num_workers: int,
    pin_memory: bool,
    caption_dropout: CaptionDropout | None = None,
) -> Iterator[dict[str, Any]]:
    """Endless batches from position ``start``, prepared by ``num_workers`` processes (0: inline),
    in pinned memory when ``pin_memory`` (for non-blocking copies to the GPU), captions dropped by
    ``caption_dropout``."""
    loader = DataLoader(
        PositionedBatches(samples, order, caption_dropout),
        batch_size=None,  # items are batches already
        sampler=itertools.count(start),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
    )
    return iter(loader)
