"""``crepa demo``: the synthetic world (fast), the verdict's arithmetic (fast) and the whole quick demo
end to end through the CLI (report files, table of finite numbers for every variant)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
from typer.testing import CliRunner

from crepa.cli import app
from crepa.demo.verdict import Aggregate, compare, summary_sentences, verdict
from crepa.demo.world import (
    COLOURS,
    LABELS,
    SPLITS,
    WorldSettings,
    clip_spec,
    frame_labels,
    render_clip,
    split_arrays,
    write_world,
)
from crepa.io.video import probe_video, read_video_frames

SMALL = WorldSettings(seed=3, clips={"generic": 4, "attribute": 3, "heldout": 2})


def test_world_is_a_function_of_its_seed():
    for split in SPLITS:
        for index in range(3):
            first, second = clip_spec(SMALL, split, index), clip_spec(SMALL, split, index)
            assert first == second
            np.testing.assert_array_equal(render_clip(first, SMALL).frames, render_clip(second, SMALL).frames)
    other = replace(SMALL, seed=4)
    assert clip_spec(other, "generic", 0) != clip_spec(SMALL, "generic", 0)
    frames, labels = split_arrays(SMALL, "generic")
    assert frames.shape == (4, SMALL.num_frames, SMALL.size, SMALL.size, 3) and frames.dtype == np.uint8
    assert labels.shape == (4, SMALL.num_frames, len(LABELS))


def test_captions_and_labels_come_from_the_attributes():
    for index in range(40):
        generic = clip_spec(SMALL, "generic", index)
        assert "bounces" not in generic.caption
        assert all((obj.shape, obj.pattern) != ("star", "dot") for obj in generic.objects)
        user = clip_spec(SMALL, "attribute", index)
        assert any(obj.caption().endswith(("bounces left", "bounces right")) for obj in user.objects)
        for spec in (generic, user):
            for obj in spec.objects:
                assert obj.colour in COLOURS and obj.colour in spec.caption and obj.shape in spec.caption
            labels = frame_labels(spec, render_clip(spec, SMALL).visibility)
            front = spec.objects[-1]  # drawn last, never occluded
            assert labels[:, LABELS.index(front.shape)].any() and labels[:, LABELS.index(front.colour)].any()


def test_world_is_written_as_mp4_with_captions_and_reused(tmp_path):
    world, reused = write_world(tmp_path / "world", SMALL, progress=False)
    assert not reused
    for split in SPLITS:
        videos = sorted(world.split_dir(split).glob("*.mp4"))
        assert len(videos) == SMALL.clips[split]
        for video, spec in zip(videos, world.specs[split], strict=True):
            probe = probe_video(video)
            assert (probe.num_frames, probe.height, probe.width) == (SMALL.num_frames, SMALL.size, SMALL.size)
            assert video.with_suffix(".txt").read_text().strip() == spec.caption
            decoded, _ = read_video_frames(video)
            rendered = render_clip(spec, SMALL).frames.astype(float)
            error = np.abs(decoded.astype(float) - rendered)  # lossless H.264, but chroma is 4:2:0
            assert np.median(error) <= 2 and error.mean() < 8
    stamp = (tmp_path / "world" / "demo-stamp.json").stat().st_mtime_ns
    assert write_world(tmp_path / "world", SMALL, progress=False)[1]
    assert (tmp_path / "world" / "demo-stamp.json").stat().st_mtime_ns == stamp


def _entries(means: dict[str, tuple[float, ...]]) -> dict[str, dict[str, Aggregate]]:
    metrics = ("subject_consistency", "temporal_flickering", "warping_error", "frechet_distance", "cknna")
    motion = {"dynamic_degree": Aggregate((1.0, 1.0)), "flow_magnitude": Aggregate((1.0, 1.1))}
    return {v: {m: Aggregate(values) for m in metrics} | motion for v, values in means.items()}


def test_verdict_separates_only_differences_larger_than_the_seed_spread():
    apart = _entries({"none": (0.10, 0.11), "repa": (0.20, 0.21), "crepa": (0.30, 0.31)})
    comparisons = compare(apart)
    subject = next(c for c in comparisons if c.metric == "subject_consistency")
    assert subject.order == ("crepa", "repa", "none") and subject.clearly_better("crepa", "repa")
    warping = next(c for c in comparisons if c.metric == "warping_error")  # lower is better
    assert warping.order == ("none", "repa", "crepa") and warping.clearly_better("none", "crepa")
    text = " ".join(summary_sentences(comparisons, seeds=2))
    assert "CREPA is better than no alignment on subject consistency, temporal flickering and CKNNA" in text
    assert "cross-frame term itself (CREPA against REPA*, which differ only in it) helps on" in text
    overlapping = _entries({"none": (0.1, 0.3), "repa": (0.15, 0.3), "crepa": (0.2, 0.3)})
    paragraphs = verdict(overlapping, overlapping["none"], {}, seeds=2)
    assert "within seed noise" in " ".join(paragraphs["summary"])
    assert all("within the seed spread" in sentence for sentence in paragraphs["metrics"])
    single = _entries({"none": (0.1,), "repa": (0.2,), "crepa": (0.3,)})
    assert "no spread" in " ".join(verdict(single, single["none"], {}, seeds=1)["metrics"])


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "report.json", "curves.png", "samples.gif"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_video_frames(out / "samples.gif")[0].shape[0] == SMALL.num_frames
    report = json.loads((out / "report.json").read_text())
    seeds = report["seeds"]
    for variant in ("none", "repa", "crepa"):
        for metric, entry in report["aggregates"][variant].items():
            assert len(entry["values"]) == seeds, (variant, metric)
            assert all(math.isfinite(value) for value in entry["values"]), (variant, metric)
    markdown = (out / "report.md").read_text()
    for row in ("| no alignment |", "| REPA* |", "| CREPA |"):
        assert row in markdown
    assert "## Verdict" in markdown and "<table>" in (out / "report.html").read_text()
    assert "CREPA" in result.output  # the terminal ends with the table
    for run in report["runs"]:
        assert (out / "runs" / run / "pytorch_lora_weights.safetensors").is_file()
