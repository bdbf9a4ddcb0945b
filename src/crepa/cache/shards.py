"""Safetensors shards of cache parts, each part checksummed, written atomically, verified on read.

A *part* is the tensors of one kind computed for one key: "latents" {"latents"}, "text"
{"prompt_embeds", ...} or "teacher" {"teacher"}. A shard holds parts of one kind; tensor names
are ``"<key>/<name>"`` and the shard's safetensors metadata (``"crepa"``, JSON) lists each part's
kind and checksum, so shards describe themselves and a killed run leaves only whole shards behind.

A damaged shard (truncated file, broken header, bytes that no longer match a checksum) is
detected when it is scanned or read; its parts are then treated as missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from crepa.cache.atomic import atomic_write_bytes

PartKind = Literal["latents", "text", "teacher"]
PART_KINDS: tuple[PartKind, ...] = ("latents", "text", "teacher")
SHARD_SUFFIX = ".safetensors"
_METADATA_KEY = "crepa"
_FORMAT_VERSION = 1


class DamagedShardError(RuntimeError):
    """A shard (or one part in it) is truncated, unparsable or does not match its checksum."""


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def to_storage(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Floating tensors -> float16 on the CPU (others kept); raises if a value does not fit float16."""
    stored = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{what}: {name} has values that are not finite in float16 (overflow or NaN in the "
                    "encoder); check the input and run the encoder in float32 (model.dtype = 'fp32')"
                )
        stored[name] = tensor.contiguous()
    return stored


@dataclass(frozen=True)
class PartLocation:
    """Where one part lives: ``shard`` is a file name inside the shards directory."""

    key: str
    kind: PartKind
    shard: str
    checksum: str
    shapes: dict[str, tuple[int, ...]]
    nbytes: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.shapes))


def write_shard(
    path: Path, kind: PartKind, parts: Mapping[str, Mapping[str, torch.Tensor]]
) -> list[PartLocation]:
    """Write ``parts`` ({key: {name: tensor}}, already in storage dtype) as one shard, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, object]] = {}
    locations = []
    for key, part in parts.items():
        checksum = tensors_checksum(part)
        index[key] = {"kind": kind, "checksum": checksum}
        tensors.update({f"{key}/{name}": tensor for name, tensor in part.items()})
        shapes = {name: tuple(tensor.shape) for name, tensor in part.items()}
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in part.values())
        locations.append(PartLocation(key, kind, path.name, checksum, shapes, nbytes))
    document = json.dumps({"version": _FORMAT_VERSION, "parts": index}, sort_keys=True)
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={_METADATA_KEY: document}))
    return locations


def read_shard_index(path: Path) -> list[PartLocation]:
    """The parts a shard declares, from its header; checks that the file is as long as the header says.

    Raises :class:`DamagedShardError` for a truncated file or a broken header (no tensor bytes are read).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size - 8:
                raise DamagedShardError(f"{path}: truncated ({size} bytes, header claims {header_length})")
            header = json.loads(handle.read(header_length))
        data_end = max(
            (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0
        )
        if 8 + header_length + data_end != size:
            raise DamagedShardError(
                f"{path}: truncated or padded ({size} bytes, expected {8 + header_length + data_end})"
            )
        document = json.loads(header["__metadata__"][_METADATA_KEY])
        if document.get("version") != _FORMAT_VERSION:
            raise DamagedShardError(
                f"{path}: cache format version {document.get('version')}, expected {_FORMAT_VERSION}"
            )
        shapes: dict[str, dict[str, tuple[int, ...]]] = {key: {} for key in document["parts"]}
        nbytes = dict.fromkeys(document["parts"], 0)
        for name, entry in header.items():
            if name != "__metadata__":
                key, tensor_name = name.split("/", 1)
                shapes[key][tensor_name] = tuple(entry["shape"])
                nbytes[key] += entry["data_offsets"][1] - entry["data_offsets"][0]
        return [
            PartLocation(key, entry["kind"], path.name, entry["checksum"], shapes[key], nbytes[key])
            for key, entry in document["parts"].items()
        ]
    except DamagedShardError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise DamagedShardError(
            f"{path}: unreadable shard header ({type(error).__name__}: {error})"
        ) from None


class ShardReader:
    """Reads parts from shards in ``directory`` (memory-mapped, one open handle per shard), verifying
    each part's checksum the first time this process reads it (not on every epoch)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        self._verified: set[tuple[str, str]] = set()  # (shard, part key)

    def read(self, location: PartLocation, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one part; raises :class:`DamagedShardError` when they do not match the checksum."""
        path = self.directory / location.shard
        try:
            handle = self._handles.get(location.shard)
            if handle is None:
                handle = self._handles[location.shard] = safetensors.safe_open(str(path), framework="pt")
            part = {name: handle.get_tensor(f"{location.key}/{name}") for name in location.names}  # type: ignore[attr-defined]
        except DamagedShardError:
            raise
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise DamagedShardError(
                f"{path}: cannot read part {location.key} ({type(error).__name__}: {error})"
            ) from None
        if verify and (location.shard, location.key) not in self._verified:
            if tensors_checksum(part) != location.checksum:
                raise DamagedShardError(
                    f"{path}: part {location.key} ({location.kind}) does not match its checksum"
                )
            self._verified.add((location.shard, location.key))
        return part

    def close(self) -> None:
        self._handles.clear()

    def __getstate__(self) -> dict[str, object]:
        """Open handles are not pickled (DataLoader workers open their own)."""
        return {"directory": self.directory, "_handles": {}, "_verified": set()}


class ShardWriter:
    """Buffers parts per kind and writes a shard whenever a kind's buffer reaches ``max_bytes``.

    Shards are named ``<kind>-<prefix>-<n>.safetensors``; ``prefix`` must be unique per process
    and run (e.g. a random id and the rank). :attr:`written` lists every part written so far.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.written: list[PartLocation] = []
        self._buffers: dict[PartKind, dict[str, dict[str, torch.Tensor]]] = {kind: {} for kind in PART_KINDS}
        self._sizes: dict[PartKind, int] = dict.fromkeys(PART_KINDS, 0)
        self._count = 0

    def add(self, kind: PartKind, key: str, part: Mapping[str, torch.Tensor]) -> None:
        """Queue one part (tensors in storage dtype); writes the kind's shard once it is large enough."""
        self._buffers[kind][key] = dict(part)
        self._sizes[kind] += sum(tensor.numel() * tensor.element_size() for tensor in part.values())
        if self._sizes[kind] >= self.max_bytes:
            self.flush(kind)

    def flush(self, kind: PartKind | None = None) -> None:
        """Write the buffered parts of ``kind`` (None: of every kind) to new shards."""
        for name in PART_KINDS if kind is None else (kind,):
            if not self._buffers[name]:
                continue
            path = self.directory / f"{name}-{self.prefix}-{self._count:05d}{SHARD_SUFFIX}"
            self._count += 1
            # Taken out of the buffer before the write: a Ctrl-C just after the shard's rename must
            # not leave the parts queued for the final flush (they would be stored twice). A write
            # that fails loses them here; the next run computes them again.
            parts, self._buffers[name], self._sizes[name] = self._buffers[name], {}, 0
            self.written += write_shard(path, name, parts)


class ShardIndex:
    """The parts present in a shards directory, from the shard headers.

    :meth:`has` verifies a shard completely (every part against its checksum) the first time one
    of its parts is asked for; a shard that fails is recorded in :attr:`damaged` (file name ->
    reason) and none of its parts count as present.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.shards: dict[str, list[PartLocation]] = {}
        self.damaged: dict[str, str] = {}
        self._by_key: dict[str, list[PartLocation]] = {}
        self._verified: set[str] = set()
        for path in sorted(self.directory.glob(f"*{SHARD_SUFFIX}")):
            try:
                self.shards[path.name] = read_shard_index(path)
            except DamagedShardError as error:
                self.damaged[path.name] = str(error)
                continue
            for location in self.shards[path.name]:
                self._by_key.setdefault(location.key, []).append(location)

    def locate(self, key: str) -> PartLocation | None:
        """Where ``key`` lives (first undamaged shard by name), without verifying it."""
        return next((loc for loc in self._by_key.get(key, []) if loc.shard not in self.damaged), None)

    def has(self, key: str) -> bool:
        """Whether an undamaged, verified copy of part ``key`` exists."""
        return any(
            location.shard not in self.damaged and self._verify(location.shard)
            for location in self._by_key.get(key, [])
        )

    def mark_damaged(self, shard: str, reason: str) -> None:
        self.damaged.setdefault(shard, reason)

    def _verify(self, shard: str) -> bool:
        if shard in self._verified:
            return True
        reader = ShardReader(self.directory)
        try:
            for location in self.shards[shard]:
                reader.read(location, verify=True)
        except DamagedShardError as error:
            self.damaged[shard] = str(error)
            return False
        finally:
            reader.close()
        self._verified.add(shard)
        return True
