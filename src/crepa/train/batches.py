"""Deterministic, resumable batch order over a bucketed dataset.

Every batch holds samples of one bucket (equal tensor shapes). The order of an epoch is a function
of (seed, epoch) only, so a run resumed at batch position p sees exactly the batches an
uninterrupted run would have seen from p on. Under data parallelism rank r takes every world-th
batch, and every rank gets the same number of batches per epoch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence

import torch


class BucketedBatchOrder:
    """Batches of sample indices. ``buckets[i]`` is sample i's bucket key (e.g. (T, H, W))."""

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if not buckets:
            raise ValueError("the dataset is empty: nothing to train on (check the cache / data.source)")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        if len(self.epoch_batches(0)) == 0:
            raise ValueError(
                f"no bucket holds train.batch_size={batch_size} x {world_size} process(es) samples; "
                "lower train.batch_size or add clips"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (incomplete batches are dropped)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.buckets), generator=generator).tolist()
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

    def iterate(self, start: int = 0) -> Iterator[list[int]]:
        """Endless batches from position ``start`` (batches this rank already consumed)."""
        per_epoch = len(self.epoch_batches(0))
        epoch, offset = divmod(start, per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0
