"""[[data.sources]]: several datasets in one run, each with repeats, a caption prefix and its own
buckets; repeats multiply a source's samples per epoch; the old single data.source keeps working."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crepa.cache.dataset import CachedDataset
from crepa.config import ConfigError, load_config
from crepa.data.mixture import source_shares
from crepa.precompute import precompute
from crepa.train.batches import BucketedBatchOrder
from helpers import run_cli, two_sources, with_sources, write_world


def test_repeats_3_supply_three_times_the_samples_of_repeats_1_per_epoch():
    buckets = [(9, 32, 32)] * 8  # sources 0 and 1 with 4 samples each, one bucket
    repeats = [3] * 4 + [1] * 4
    for batch_size in (1, 2):
        order = BucketedBatchOrder(buckets, batch_size, seed=5, repeats=repeats)
        for epoch in range(3):
            drawn = Counter(index < 4 for batch in order.epoch_batches(epoch) for index in batch)
            assert drawn[True] == 12 and drawn[False] == 4
    assert source_shares([3, 1], [0] * 4 + [1] * 4) == [0.75, 0.25]


def test_no_repeats_keeps_the_batch_order():
    buckets = [(9, 32, 32)] * 6 + [(5, 32, 32)] * 4
    plain = BucketedBatchOrder(buckets, 2, seed=1)
    ones = BucketedBatchOrder(buckets, 2, seed=1, repeats=[1] * 10)
    assert all(plain.epoch_batches(e) == ones.epoch_batches(e) for e in range(4))


def test_two_sources_precompute_with_prefix_and_own_buckets(tmp_path, capsys):
    run = two_sources(tmp_path)
    config = load_config(run)
    precompute(config, progress=False)
    dataset = CachedDataset(config.cache.dir)
    by_source = Counter(entry.source for entry in dataset.entries)
    assert by_source == {0: 4, 1: 4}
    for entry in dataset.entries:
        assert entry.caption.startswith("sks, a ") == (entry.source == 0)
        assert entry.num_frames == (9 if entry.source == 0 else 5)
    # the trainer reads them with the repeats and reports each source's share
    from crepa.train.recipe import train

    train(load_config(run, ["train.max_steps=1", "crepa.enabled=false"]), progress=False)
    printed = capsys.readouterr().out
    assert "4 samples x 3 repeats = 75.0%" in printed and "4 samples x 1 repeats = 25.0%" in printed


def test_data_source_or_sources_not_both_nor_neither(tmp_path):
    run = write_world(tmp_path, "wan")
    both = run.read_text() + '\n[[data.sources]]\npath = "clips"\n'
    (tmp_path / "both.toml").write_text(both)
    with pytest.raises(ConfigError, match=r"data: .*data\.source.*not both"):
        load_config(tmp_path / "both.toml")
    (tmp_path / "neither.toml").write_text(run.read_text().replace('source = "clips"\n', ""))
    with pytest.raises(ConfigError, match=r"data: .*neither"):
        load_config(tmp_path / "neither.toml")


def test_a_source_with_frame_counts_the_family_cannot_encode_exits_2(tmp_path):
    run = two_sources(tmp_path)
    run.write_text(run.read_text().replace("num_frames = [5]", "num_frames = [6]"))
    result = run_cli("train", str(run), "--no-progress", cwd=tmp_path)
    stderr = result.stderr
    assert result.returncode == 2 and "data.sources[1].num_frames" in stderr


def write_images(directory: Path, count: int, height: int, width: int, suffix: str = ".png") -> None:
    """Still images with captions (flat colours), written through PIL."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., i % 3] = 60 * (i + 1)
        Image.fromarray(pixels).save(directory / f"image{i}{suffix}")
        (directory / f"image{i}.txt").write_text(f"a flat picture number {i}")


def test_images_are_one_frame_clips_of_their_source(tmp_path):
    run = write_world(tmp_path, "wan")
    write_images(tmp_path / "images", 1, 32, 32)
    write_images(tmp_path / "images", 1, 32, 32, ".jpg")  # image0.jpg: one more image (its own caption below)
    (tmp_path / "images/image0.jpg").rename(tmp_path / "images/other.jpg")
    (tmp_path / "images/other.txt").write_text("a flat picture in jpeg")
    run = with_sources(
        run,
        """
[[data.sources]]
path = "clips"

[[data.sources]]
path = "images"
num_frames = [1]
caption_prefix = "photo: "
""",
    )
    config = load_config(run)
    precompute(config, progress=False)
    dataset = CachedDataset(config.cache.dir)
    images = [entry for entry in dataset.entries if entry.source == 1]
    assert len(images) == 2 and all(entry.num_frames == 1 and entry.grid[0] == 1 for entry in images)
    assert all(entry.caption.startswith("photo: a flat picture") for entry in images)
    image = dataset[dataset.entries.index(images[0])]
    assert image["latents"].shape[1] == 1  # (C, F=1, h, w)
    from crepa.train.recipe import train

    summary = train(load_config(run, ["train.max_steps=2", "train.batch_size=2"]), progress=False)
    assert summary.steps == 2 and np.isfinite(summary.final_metrics["loss/total"])


def test_images_in_a_source_without_a_one_frame_bucket_are_skipped_with_the_reason(tmp_path):
    from crepa.data import SamplingConfig, scan_dataset

    write_images(tmp_path / "images", 1, 32, 32)
    samples, report = scan_dataset(
        tmp_path / "images", SamplingConfig(frame_buckets=(9,), resolution_buckets=((32, 32),))
    )
    assert not samples and "add 1 to its source's num_frames" in report.summary()


def test_images_for_a_family_without_one_frame_clips_exit_2(tmp_path):
    run = write_world(tmp_path, "cogvideox_1_5")  # patches 2 latent frames per token
    write_images(tmp_path / "images", 2, 32, 32)
    run = with_sources(
        run, '\n[[data.sources]]\npath = "clips"\n\n[[data.sources]]\npath = "images"\nnum_frames = [1]\n'
    )
    result = run_cli("train", str(run), "--no-progress", cwd=tmp_path)
    stderr = result.stderr
    assert result.returncode == 2 and "data.sources[1].num_frames: 1 is the frame count of images" in stderr
