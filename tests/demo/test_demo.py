"""``crepa demo``: the synthetic world (fast), the verdict's arithmetic (fast) and the whole quick demo
end to end through the CLI (report files, table of finite numbers for every variant)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crepa.cli import app
from crepa.demo.base import PIPELINE_DIR, BaseSettings, build_base_model, build_initial_pipeline
from crepa.demo.evaluate import psnr, world_metrics
from crepa.demo.report import how_it_is_built
from crepa.demo.run import DemoSettings
from crepa.demo.verdict import METRICS, QUALITY_METRICS, demo_verdict
from crepa.demo.world import (
    ATTRIBUTE_GROUPS,
    COLOURS,
    LABELS,
    MOTION_LABELS,
    PROBE,
    SPLITS,
    RenderedSplit,
    WorldSettings,
    clip_spec,
    frame_labels,
    render_clip,
    split_arrays,
    write_world,
)
from crepa.demo.world_section import finetuning_gap, layer_profiles, world_blocks
from crepa.experiment.report import comparisons, to_markdown, verdict_paragraphs
from crepa.experiment.runfiles import VARIANT_LABELS
from crepa.experiment.runner import ExperimentResults
from crepa.io.video import probe_video, read_video_frames

SMALL = WorldSettings(seed=3, clips={"generic": 4, "attribute": 3, "heldout": 2, PROBE: 2})


def test_world_is_a_function_of_its_seed():
    for split in SPLITS:
        for index in range(3):
            first, second = clip_spec(SMALL, split, index), clip_spec(SMALL, split, index)
            assert first == second
            np.testing.assert_array_equal(render_clip(first, SMALL).frames, render_clip(second, SMALL).frames)
    other = replace(SMALL, seed=4)
    assert clip_spec(other, "generic", 0) != clip_spec(SMALL, "generic", 0)
    arrays = split_arrays(SMALL, "generic")
    assert (
        arrays.clips.shape == (4, SMALL.num_frames, SMALL.size, SMALL.size, 3)
        and arrays.clips.dtype == np.uint8
    )
    assert arrays.labels.shape == (4, SMALL.num_frames, len(LABELS))
    assert arrays.counts.shape == (4, SMALL.num_frames) and arrays.motions.shape == (4, len(MOTION_LABELS))


def test_clips_are_long_enough_and_objects_disappear_and_reappear():
    assert SMALL.num_frames >= 25 and (SMALL.num_frames - 1) % 4 == 0  # >= 7 latent frames at 4x
    reappearing = 0
    for index in range(40):
        spec = clip_spec(SMALL, "heldout", index)
        visible = render_clip(spec, SMALL).visibility >= 0.25  # (T, objects)
        for column in visible.T:
            hidden = np.flatnonzero(~column)
            # hidden for a while, visible before and after: an occlusion and a re-appearance
            if hidden.size and column[: hidden[0]].any() and column[hidden[-1] :].any():
                reappearing += 1
    assert reappearing >= 5


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


def test_world_metrics_against_a_naive_loop():
    rng = np.random.default_rng(0)
    specs = [clip_spec(SMALL, "heldout", index) for index in range(6)]
    frames = 5
    attributes = rng.random((6, frames, len(LABELS))) < 0.3
    counts = rng.integers(0, 3, size=(6, frames))
    motions = rng.random((6, len(MOTION_LABELS))) < 0.3
    # make clip 0 perfect: the caption's attributes in every frame, its count, its motions
    attributes[0] = False
    for obj in specs[0].objects:
        for name in (obj.shape, obj.colour, obj.pattern):
            attributes[0, :, LABELS.index(name)] = True
    counts[0] = len(specs[0].objects)
    motions[0] = False
    for obj in specs[0].objects:
        motions[
            0, MOTION_LABELS.index("rotates" if obj.motion == "rotates" else f"{obj.motion} {obj.direction}")
        ] = True
    result = world_metrics(attributes, counts, motions, specs)
    for clip, spec in enumerate(specs):
        words = {name for obj in spec.objects for name in (obj.shape, obj.colour, obj.pattern)}
        for group, names in ATTRIBUTE_GROUPS.items():
            hits = 0
            for t in range(frames):
                predicted = {n for n in names if attributes[clip, t, LABELS.index(n)]}
                hits += predicted == (words & set(names))
            assert result[f"{group}_accuracy"][clip] == hits / frames
        same = sum(all(attributes[clip, t] == attributes[clip, 0]) for t in range(1, frames))
        assert result["identity_persistence"][clip] == same / (frames - 1)
        assert result["count_stability"][clip] == sum(c == len(spec.objects) for c in counts[clip]) / frames
        captioned = {
            "rotates" if o.motion == "rotates" else f"{o.motion} {o.direction}" for o in spec.objects
        }
        predicted = {name for name, on in zip(MOTION_LABELS, motions[clip], strict=True) if on}
        assert result["motion_correctness"][clip] == float(predicted == captioned)
    assert all(result[name][0] == 1.0 for name in result)


def test_psnr_against_the_closed_form():
    a = np.full((2, 3, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0, 0, 0, 0] = 110  # one value off by 10: MSE = 100 / a.size
    expected = 10 * math.log10(255**2 / (100 / a.size))
    assert abs(psnr(a, b) - expected) < 1e-6


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


def test_base_model_pretraining_prints_no_trainer_options(tmp_path, capsys):
    """The base model's pre-training is full fine-tuning; its "trainer options" line would read as the
    demo's (LoRA) fine-tuning, so it prints none."""
    # 16 generic clips: the PCA's eigen-decomposition is slow on the rank-deficient covariance of 4
    small = replace(SMALL, clips={**SMALL.clips, "generic": 16})
    world, _ = write_world(tmp_path / "world", small, progress=False)
    settings = BaseSettings(latent_channels=8, heads=2, head_dim=16, layers=1, steps=1, batch_size=2)
    generic = RenderedSplit(small, "generic")
    build_initial_pipeline(tmp_path / "initial", generic, settings, {})
    capsys.readouterr()
    build_base_model(
        tmp_path / "base",
        tmp_path / "initial",
        world.split_dir("generic"),
        tmp_path / "cache",
        small,
        settings,
        {},
        progress=False,
    )
    assert (tmp_path / "base" / PIPELINE_DIR / "transformer").is_dir()
    assert "trainer options" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("settings", "design"),
    [
        (
            DemoSettings.quick(),
            "2 seeds (paired: at a seed the variants share batches, noise, timesteps and sampling noise) and "
            "1 sampled clip(s) per held-out caption (8 clips per model); fine-tuning: 12 LoRA steps of batch 4, "
            "rank 8 on attention + feed-forward, lr 0.002, alignment weight 0.5 on block 1 of 4.",
        ),
        (
            DemoSettings(),
            "4 seeds (paired: at a seed the variants share batches, noise, timesteps and sampling noise) and "
            "2 sampled clip(s) per held-out caption (48 clips per model); fine-tuning: 150 LoRA steps of "
            "batch 8, rank 8 on attention + feed-forward, lr 0.002, alignment weight 0.5 on block 1 of 4.",
        ),
    ],
)
def test_how_it_is_built_states_the_design_of_the_run_made(settings, design):
    items = how_it_is_built(asdict(settings), settings.seeds)
    assert f"Experiment design of this run: {design}" in "\n".join(items)
    assert not any("{" in item for item in items)  # every field filled in


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
        variants=[{"name": name, "label": VARIANT_LABELS.get(name, name)} for name in values],
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


def test_finetuning_gap_against_the_base_model_is_paired_per_seed():
    # Fine-tuning loses 0.02 at every seed while the seeds differ by 0.1: paired, a clear "worse".
    lost = _results({"none": (0.48, 0.58, 0.68, 0.78), "base": (0.50, 0.60, 0.70, 0.80)})
    gap = finetuning_gap(lost)
    assert {c.outcome for c in gap} == {"worse"}
    identity = next(c for c in gap if c.metric.key == "identity_persistence")
    assert identity.mean == pytest.approx(-0.02) and identity.seeds_needed == 2
    text = to_markdown(world_blocks(lost, {"reconstruction": {"psnr": {"value": 23.5}}}, block_index=1))
    assert "identity persistence -0.02 (95% CI -0.02 to -0.02): worse" in text
    assert "round-trip PSNR of 23.5 dB" in text
    gained = _results({"none": (0.52, 0.62, 0.72, 0.82), "base": (0.50, 0.60, 0.70, 0.80)})
    assert {c.outcome for c in finetuning_gap(gained)} == {"better"}
    noise = _results({"none": (0.51, 0.59, 0.71, 0.79), "base": (0.50, 0.60, 0.70, 0.80)})
    assert {c.outcome for c in finetuning_gap(noise)} == {"no difference"}


def test_layer_profiles_average_the_seeds():
    results = _results({"none": (0.1, 0.2), "base": (0.1, 0.2)})
    results.rows["base-seed0"]["layer_similarity"] = {"per_block": [0.5, 0.7]}
    results.rows["base-seed1"]["layer_similarity"] = {"per_block": [0.7, 0.9]}
    results.rows["crepa-seed0"] = {"layer_similarity": {"per_block": [0.6, 0.6]}}
    profiles = layer_profiles(results)
    np.testing.assert_allclose(profiles["base"], [0.6, 0.8])
    np.testing.assert_allclose(profiles["crepa"], [0.6, 0.6])
    assert "none" not in profiles


# ~95 s on 2 cores (the whole quick demo; `make demo` runs the full one): the slow suite
@pytest.mark.slow
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
    # The headline names its primary metrics and correction; CKNNA is a diagnostic, exploratory.
    assert report["plan"]["primary"] == [
        "subject_consistency",
        "temporal_flickering",
        "warping_error",
        "frechet_distance",
    ]
    assert "12 headline questions were asked (3 pairs x 4 primary metrics" in markdown
    assert "survives Holm-Bonferroni over all 12" in markdown
    assert "CKNNA is a diagnostic of the trained representation" in markdown
    for record in report["comparisons"]:
        primary = record["metric"] in report["plan"]["primary"]
        assert record["correction"] == ("holm" if primary else "benjamini-hochberg"), record["metric"]
        assert record["p_adjusted"] >= record["p_value"]
        # Per-clip values reached the report: the consistency metrics carry the motion-adjusted comparison.
        consistency = record["metric"] in ("subject_consistency", "temporal_flickering", "warping_error")
        assert (record["motion_adjusted"] is not None) == consistency, record["metric"]
    assert "CREPA" in result.output  # the terminal ends with the table
    for run in report["runs"]:
        assert (out / "runs" / run / "pytorch_lora_weights.safetensors").is_file()


def test_demo_verdict_headlines_only_corrected_primary_metrics():
    # Noise on every metric, but CREPA's shape accuracy leads by about 0.05 at every seed: a lead in an
    # exploratory metric, reported with its q-value and never as an effect.
    results = _results(
        {
            "none": (0.10, 0.20, 0.30, 0.40),
            "repa": (0.12, 0.19, 0.30, 0.41),
            "crepa": (0.09, 0.22, 0.29, 0.40),
        }
    )
    for seed, lead in enumerate((0.05, 0.06, 0.04, 0.05)):
        none = results.rows[f"none-seed{seed}"]["shape_accuracy"]["value"]
        results.rows[f"crepa-seed{seed}"]["shape_accuracy"] = {"value": none + lead}
    text, found = _verdict_text(results)
    shape = next(
        c for c in found if (c.metric.key, c.candidate, c.baseline) == ("shape_accuracy", "crepa", "none")
    )
    assert shape.family == "exploratory" and shape.correction == "benjamini-hochberg"
    assert shape.p_adjusted == pytest.approx(min(1.0, shape.p_value * 21))  # the one small p among 21
    assert {c.metric.key for c in found if c.family == "primary"} == {
        "subject_consistency",
        "temporal_flickering",
        "warping_error",
        "frechet_distance",
    }
    paragraphs = verdict_paragraphs(results, found)
    assert paragraphs["questions"][0].startswith(
        "12 headline questions were asked (3 pairs x 4 primary metrics"
    )
    assert (
        "CREPA vs no alignment: no difference detectable with 4 seeds and 8 clips on any primary metric"
        in text
    )
    assert "this run shows no effect of alignment" in text
    assert (
        f"shape accuracy higher for CREPA than no alignment (p = {shape.p_value:.2g}, q = {shape.p_adjusted:.2g})"
        in (paragraphs["exploratory"][0])
    )
    assert "CKNNA is a diagnostic of the trained representation" in " ".join(
        block[1] for block in demo_verdict(results, found, {})
    )
    # With every metric ahead, the alignment sentence names the primary metrics only (not CKNNA).
    text, _ = _verdict_text(
        _results({"none": (0.10, 0.20, 0.30), "repa": (0.11, 0.21, 0.31), "crepa": (0.12, 0.22, 0.32)})
    )
    assert (
        "Alignment (REPA* or CREPA) beats no alignment on subject consistency, temporal flickering, warping "
        "error and Frechet distance (Holm-corrected)." in text
    )
