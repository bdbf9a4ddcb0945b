"""The precompute cache: safetensors shards of latents, text embeddings and teacher grids, a manifest,
and the dataset that reads them for training.

Layout of a cache directory::

    manifest.json        entries (one per sample) and the location of every part
    shards/*.safetensors parts of one kind each, checksummed, written atomically
    file_hashes.json     sha256 of the source videos, remembered by size and mtime
"""

from crepa.cache.atomic import atomic_write_bytes, atomic_write_json
from crepa.cache.dataset import CacheDamagedError, CachedDataset
from crepa.cache.manifest import MANIFEST_NAME, SHARDS_DIR, CacheEntry, Manifest
from crepa.cache.shards import (
    PART_KINDS,
    DamagedShardError,
    PartKind,
    PartLocation,
    ShardIndex,
    ShardReader,
    ShardWriter,
    read_shard_index,
    tensors_checksum,
    to_storage,
    write_shard,
)

__all__ = [
    "MANIFEST_NAME",
    "PART_KINDS",
    "SHARDS_DIR",
    "CacheDamagedError",
    "CacheEntry",
    "CachedDataset",
    "DamagedShardError",
    "Manifest",
    "PartKind",
    "PartLocation",
    "ShardIndex",
    "ShardReader",
    "ShardWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_shard_index",
    "tensors_checksum",
    "to_storage",
    "write_shard",
]
