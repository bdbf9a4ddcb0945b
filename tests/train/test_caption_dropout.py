"""Caption dropout: the dropped fraction is binomial(n, p), dropped samples carry exactly the cached
empty-prompt embedding, the draw depends on (seed, position) only, and a run with it resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import stats

from crepa.cache.dataset import CachedDataset
from crepa.config import ConfigError, load_config
from crepa.models import FAMILIES
from crepa.precompute import precompute
from crepa.train.batches import BucketedBatchOrder, batch_loader
from crepa.train.caption_dropout import CaptionDropout, dropped_rows
from crepa.train.preflight import open_dataset
from helpers import write_world


@pytest.mark.parametrize("probability", [0.1, 0.5])
def test_dropped_fraction_over_10000_draws_is_inside_the_binomial_interval(probability):
    null = {"prompt_embeds": torch.zeros(3, 2), "pooled_prompt_embeds": torch.zeros(2)}
    dropout = CaptionDropout(probability, null, seed=7)
    dropped = 0
    for position in range(1000):  # 1000 batches of 10 samples: 10,000 draws
        batch = {"prompt_embeds": torch.ones(10, 3, 2), "pooled_prompt_embeds": torch.ones(10, 2)}
        out = dropout(position, batch)
        rows = out["prompt_embeds"].flatten(1).eq(0).all(dim=1)
        assert torch.equal(rows, out["pooled_prompt_embeds"].eq(0).all(dim=1))  # both parts drop together
        assert out["prompt_embeds"][~rows].eq(1).all()  # kept captions are untouched
        dropped += int(rows.sum())
    low, high = stats.binom.interval(0.999, 10_000, probability)
    assert low <= dropped <= high


def test_draw_is_a_function_of_seed_and_position():
    assert torch.equal(dropped_rows(0.5, 3, 11, 0, 64), dropped_rows(0.5, 3, 11, 0, 64))
    assert not torch.equal(dropped_rows(0.5, 3, 11, 0, 64), dropped_rows(0.5, 3, 12, 0, 64))
    assert not torch.equal(dropped_rows(0.5, 3, 11, 0, 64), dropped_rows(0.5, 4, 11, 0, 64))
    assert not dropped_rows(0.0, 3, 11, 0, 64).any() and dropped_rows(1.0, 3, 11, 0, 64).all()


def test_loader_batches_carry_the_cached_empty_prompt(tmp_path):
    run = write_world(tmp_path, "wan")
    config = load_config(run)
    precompute(config, progress=False)
    dataset = CachedDataset(config.cache.dir)
    null = dataset.null_text()
    order = BucketedBatchOrder(dataset.buckets, 2, seed=0)
    dropout = CaptionDropout(0.5, null, seed=0)
    plain = batch_loader(dataset, order, 0, 0, False)
    dropped = batch_loader(dataset, order, 0, 0, False, dropout)
    seen = 0
    for position in range(8):
        a, b = next(plain), next(dropped)
        rows = dropped_rows(0.5, 0, position, 0, 2)
        for row in range(2):
            expected = null["prompt_embeds"] if rows[row] else a["prompt_embeds"][row]
            assert torch.equal(b["prompt_embeds"][row], expected)
        assert torch.equal(a["latents"], b["latents"])
        seen += int(rows.sum())
    assert 0 < seen < 16
    assert not torch.equal(null["prompt_embeds"], a["prompt_embeds"][0])  # the empty prompt differs


def test_a_cache_without_the_empty_prompt_is_refused(tmp_path):
    run = write_world(tmp_path, "wan")
    config = load_config(run, ["data.caption_dropout=0.2"])
    precompute(config, progress=False)
    manifest = config.cache.dir / "manifest.json"
    document = json.loads(manifest.read_text())
    document["null_text"] = None  # a cache written before the empty prompt was precomputed
    manifest.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"data\.caption_dropout"):
        open_dataset(config, FAMILIES["wan"], external_teacher=True)
