"""``crepa demo``: the synthetic world (fast), the verdict's arithmetic (fast) and the whole quick demo
end to end through the CLI (report files, table of finite numbers for every variant)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from crepa.cli import app
from crepa.demo.verdict import METRICS, QUALITY_METRICS, demo_verdict
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
from crepa.experiment.report import comparisons, verdict_paragraphs
from crepa.experiment.runfiles import VARIANT_LABELS
from crepa.experiment.runner import ExperimentResults
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


def _rows(values: dict[str, tuple[float, ...]]) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluation rows ``<variant>-seed<k>``: every quality metric equal to ``values[variant][k]``,
    warping error and Frechet distance (lower is better) its negative, flow magnitude 1."""
    lower = ("warping_error", "frechet_distance")
    rows = {}
    for variant, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            entries = {m: {"value": -value if m in lower else value} for m in QUALITY_METRICS}
            rows[f"{variant}-seed{seed}"] = entries | {"flow_magnitude": {"value": 1.0}}
    return rows


def _results(values: dict[str, tuple[float, ...]]) -> ExperimentResults:
    rows = _rows(values)
    return ExperimentResults(
        variants=[{"name": name, "label": VARIANT_LABELS[name]} for name in values],
        seeds=list(range(len(values["none"]))),
        prompts=["a prompt"] * 8,
        metrics=list(METRICS),
        rows=rows,
        runs=list(rows),
        base=False,
        stage_seconds={},
        work={},
        machine={},
        out=Path("."),
    )


def _verdict_text(results: ExperimentResults) -> tuple[str, list]:
    found = comparisons(results)
    paragraphs = verdict_paragraphs(results, found)
    extra = [block[1] for block in demo_verdict(results, found, {})]
    return " ".join(paragraphs["method"] + paragraphs["summary"] + extra), found


def test_demo_verdict_uses_paired_differences():
    # The seed effect (0.1 between seeds) is larger than the variant effect (0.01), but shared by the
    # variants: unpaired spreads would overlap, the paired differences are constant.
    text, found = _verdict_text(
        _results({"none": (0.10, 0.20, 0.30), "repa": (0.11, 0.21, 0.31), "crepa": (0.12, 0.22, 0.32)})
    )
    assert {c.outcome for c in found} == {"better"}
    assert "CREPA vs no alignment: better on subject consistency, temporal flickering, warping error" in text
    assert "cross-frame term itself (CREPA against REPA*, which differ only in it) helps on" in text
    text, found = _verdict_text(
        _results({"none": (0.10, 0.20, 0.30), "repa": (0.12, 0.19, 0.30), "crepa": (0.09, 0.22, 0.29)})
    )
    assert {c.outcome for c in found} == {"no difference"}
    assert "no difference detectable with 3 seeds and 8 clips on any metric" in text
    assert "this run shows no effect of alignment" in text
    text, _ = _verdict_text(_results({"none": (0.1,), "repa": (0.2,), "crepa": (0.3,)}))
    assert "one seed per variant" in text


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "report.json", "curves.png", "samples.gif"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_video_frames(out / "samples.gif")[0].shape[0] == SMALL.num_frames
    report = json.loads((out / "report.json").read_text())
    seeds = len(report["seeds"])
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
