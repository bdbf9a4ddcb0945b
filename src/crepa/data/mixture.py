"""Several datasets in one run: each source's share of an epoch's samples (and so of the steps)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def source_shares(repeats: Sequence[int], sample_sources: Sequence[int]) -> list[float]:
    """Per source, the fraction of an epoch's draws it supplies: its samples x its repeats over the
    total. ``sample_sources[i]`` is sample i's source index."""
    counts = Counter(sample_sources)
    draws = [counts[i] * count for i, count in enumerate(repeats)]
    total = sum(draws)
    return [d / total if total else 0.0 for d in draws]


def source_shares_report(paths: Sequence[Path], repeats: Sequence[int], sample_sources: Sequence[int]) -> str:
    """One line per source (``paths[i]``, ``repeats[i]``): samples, repeats and its share of the steps."""
    counts = Counter(sample_sources)
    shares = source_shares(repeats, sample_sources)
    lines = ["data sources (share of the steps):"]
    lines += [
        f"  [{i}] {path}: {counts[i]} samples x {count} repeats = {share:.1%}"
        for i, (path, count, share) in enumerate(zip(paths, repeats, shares, strict=True))
    ]
    return "\n".join(lines)
