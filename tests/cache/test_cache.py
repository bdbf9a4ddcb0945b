"""Cache building blocks on real files: shards, checksums, damage detection, atomic writes, keys."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from crepa.cache import (
    DamagedShardError,
    ShardIndex,
    ShardReader,
    ShardWriter,
    atomic_write_bytes,
    read_shard_index,
    tensors_checksum,
    to_storage,
    write_shard,
)
from crepa.cache.keys import FileHasher, clip_facts, latents_key, source_fingerprint, teacher_key, text_key


def _part(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(6, 8, generator=generator).half(),
        "prompt_attention_mask": torch.tensor([True, True, False, False, False, False]),
    }


def _data_offset(path: Path) -> int:
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_length


def test_shard_roundtrip_is_bitwise(tmp_path: Path) -> None:
    parts = {"a": _part(0), "b": _part(1)}
    locations = write_shard(tmp_path / "text-x.safetensors", "text", parts)
    # An independent reader sees the tensors under "<key>/<name>".
    plain = safetensors.torch.load_file(tmp_path / "text-x.safetensors")
    assert set(plain) == {f"{key}/{name}" for key in parts for name in parts[key]}
    assert read_shard_index(tmp_path / "text-x.safetensors") == locations
    reader = ShardReader(tmp_path)
    for location in locations:
        read = reader.read(location)
        assert read.keys() == parts[location.key].keys()
        for name, tensor in parts[location.key].items():
            assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
        assert location.nbytes == 6 * 8 * 2 + 6
        assert location.shapes == {"prompt_embeds": (6, 8), "prompt_attention_mask": (6,)}


def test_checksum_covers_bytes_shape_and_dtype() -> None:
    part = _part(0)
    digest = hashlib.sha256()
    for name in sorted(part):
        tensor = part[name]
        digest.update(f"{name}|{str(tensor.dtype)[6:]}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert tensors_checksum(part) == digest.hexdigest()
    assert tensors_checksum({"x": torch.zeros(4)}) != tensors_checksum({"x": torch.zeros(2, 2)})
    assert tensors_checksum({"x": torch.zeros(4)}) != tensors_checksum({"x": torch.zeros(4).half()})


def test_storage_is_float16_and_refuses_overflow() -> None:
    stored = to_storage(
        {"x": torch.randn(3, dtype=torch.float64), "m": torch.ones(3, dtype=torch.int64)}, "sample"
    )
    assert stored["x"].dtype == torch.float16 and stored["m"].dtype == torch.int64
    with pytest.raises(ValueError, match=r"sample: x .*float16"):
        to_storage({"x": torch.tensor([1e6])}, "sample")


def test_writer_cuts_shards_by_size(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "run-r0", max_bytes=200)  # each part is 102 bytes
    for key in "abcde":
        writer.add("text", key, _part(0))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # a+b, c+d written; e buffered
    writer.flush()
    shards = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    assert len(shards) == 3 and all(name.startswith("text-run-r0-") for name in shards)
    assert sorted(location.key for location in writer.written) == list("abcde")


def test_truncated_shard_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "text-x.safetensors"
    write_shard(path, "text", {"a": _part(0)})
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DamagedShardError, match="truncated"):
        read_shard_index(path)
    index = ShardIndex(tmp_path)
    assert "text-x.safetensors" in index.damaged and not index.has("a")


def test_flipped_byte_fails_the_checksum_and_only_that_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "text-bad.safetensors", "text", {"a": _part(0), "b": _part(1)})
    write_shard(tmp_path / "text-good.safetensors", "text", {"c": _part(2)})
    path = tmp_path / "text-bad.safetensors"
    data = bytearray(path.read_bytes())
    data[_data_offset(path) + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    index = ShardIndex(tmp_path)
    assert index.damaged == {}  # the header is intact: found only when verified
    assert not index.has("a")
    assert not index.has("b")  # a damaged shard is given up as a whole
    assert "checksum" in index.damaged["text-bad.safetensors"]
    assert index.has("c")
    location = read_shard_index(path)[0]
    with pytest.raises(DamagedShardError):
        ShardReader(tmp_path).read(location)


def test_garbage_header_is_detected(tmp_path: Path) -> None:
    (tmp_path / "latents-x.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!")
    index = ShardIndex(tmp_path)
    assert "unreadable shard header" in index.damaged["latents-x.safetensors"]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old")

    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_file_hasher_hashes_bytes_and_notices_changes(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"frames" * 1000)
    hasher = FileHasher()
    assert hasher(video) == hashlib.sha256(b"frames" * 1000).hexdigest()
    memo = json.loads(json.dumps(hasher.memo))  # survives a JSON round trip (saved with the cache)
    stat = video.stat()
    video.write_bytes(b"FRAMES" * 1000)  # same size
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert FileHasher(memo)(video) == hashlib.sha256(b"FRAMES" * 1000).hexdigest()


def test_keys_change_exactly_with_what_they_depend_on() -> None:
    clip = clip_facts("f" * 64, [0, 2, 4], (64, 96))
    teacher = {"model": "dino@main", "kind": "auto", "max_pixels": 100, "reduce": "mean"}
    latents = latents_key(clip, "wan", "vae-a", "float32")
    text = text_key("a dog", "wan", "t5-a", 512, "float32")
    grid = teacher_key(clip, teacher, (3, 4, 6), 4)
    assert latents_key(clip, "wan", "vae-b", "float32") != latents
    assert latents_key(clip_facts("f" * 64, [0, 2, 4], (64, 128)), "wan", "vae-a", "float32") != latents
    assert latents_key(clip_facts("f" * 64, [0, 3, 6], (64, 96)), "wan", "vae-a", "float32") != latents
    assert latents_key(clip_facts("e" * 64, [0, 2, 4], (64, 96)), "wan", "vae-a", "float32") != latents
    assert text_key("a cat", "wan", "t5-a", 512, "float32") != text
    assert teacher_key(clip, {**teacher, "model": "dino-g@main"}, (3, 4, 6), 4) != grid
    assert teacher_key(clip, {**teacher, "max_pixels": 200}, (3, 4, 6), 4) != grid
    assert teacher_key(clip, teacher, (3, 2, 3), 4) != grid
    # The teacher key does not depend on the VAE, nor the latents on the teacher.
    assert teacher_key(clip, teacher, (3, 4, 6), 4) == grid
    assert latents_key(clip, "wan", "vae-a", "float32") == latents


def test_local_fingerprint_follows_configs_and_weights(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"a": 1}')
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"x" * 10)
    first = source_fingerprint(tmp_path, subfolders=("vae",))
    assert source_fingerprint(tmp_path, subfolders=("vae",)) == first
    assert source_fingerprint(tmp_path, subfolders=("text_encoder",)) != first
    (tmp_path / "vae" / "config.json").write_text('{"a": 2}')
    assert source_fingerprint(tmp_path, subfolders=("vae",)) != first
    assert source_fingerprint("org/model", "v1") == "org/model@v1"


def test_interrupt_after_shard_rename_stores_each_part_once(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C right after a shard is renamed into place, then the final flush precompute does on the way out."""
    import crepa.cache.shards as shards

    real_write = shards.write_shard

    def write_then_interrupt(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    writer = ShardWriter(tmp_path, "run-r0", max_bytes=200)  # each part is 102 bytes: a+b fill a shard
    monkeypatch.setattr(shards, "write_shard", write_then_interrupt)
    writer.add("text", "a", _part(0))
    try:
        writer.add("text", "b", _part(1))
    except KeyboardInterrupt:
        monkeypatch.undo()
        writer.flush()
    keys = [
        location.key for path in sorted(tmp_path.glob("*.safetensors")) for location in read_shard_index(path)
    ]
    assert sorted(keys) == ["a", "b"]
