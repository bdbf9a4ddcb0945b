"""`crepa eval` end to end on files written by the test, `--compare`, and the report's atomic writes."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from crepa.cli import app
from crepa.eval import report
from crepa.eval.report import write_layer_report
from crepa.eval.tiny import save_tiny_extractors
from crepa.io.video import read_video_frames, write_video
from helpers import textured_image, translating_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    tiny = save_tiny_extractors(root / "models")
    videos, reference = root / "videos", root / "reference"
    write_video(videos / "moving.mp4", translating_clip(17, 64, 64, (2, 1)), fps=8)
    write_video(videos / "fast.mp4", translating_clip(17, 64, 64, (5, 0), seed=1), fps=8)
    order = np.random.default_rng(0).permutation(17)
    write_video(videos / "shuffled.mp4", translating_clip(17, 64, 64, (2, 1), seed=2)[order], fps=8)
    write_video(videos / "loop.gif", translating_clip(9, 48, 48, (1, 0), seed=3), fps=8)
    still = videos / "still"
    still.mkdir()
    image = textured_image(64, 64, seed=4)
    for index in range(6):  # lossless PNG frames: exactly identical
        cv2.imwrite(str(still / f"frame_{index}.png"), image[..., ::-1])
    (videos / "broken.mp4").write_bytes(b"definitely not a video " * 50)
    (videos / "empty.webm").write_bytes(b"")
    (videos / "prompt.txt").write_text("a caption next to the videos is ignored")
    for seed in range(3):
        write_video(
            reference / f"real_{seed}.mp4", translating_clip(9, 64, 64, (1, 1), seed=10 + seed), fps=8
        )
    return {"videos": videos, "reference": reference, "root": root, **tiny}


def run_eval(*args: str):
    return runner.invoke(app, ["eval", *args, "--no-progress"])


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] >= 200 and image.shape[1] >= 200


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_eval_end_to_end_writes_metrics_csv_and_plots(folders):
    out = folders["root"] / "run_a"
    result = run_eval(
        str(folders["videos"]),
        "--reference",
        str(folders["reference"]),
        "--extractor",
        f"dino:{folders['dino']}",
        "--extractor",
        f"background_consistency=clip:{folders['clip']}",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable" in result.output
    assert "(skipped files in skipped.csv)" in " ".join(result.output.split())

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clips"] == 5
    assert sorted(Path(item["path"]).name for item in metrics["skipped"]) == ["broken.mp4", "empty.webm"]
    assert all(item["reason"] for item in metrics["skipped"])
    assert set(metrics["metrics"]) == {
        "subject_consistency",
        "background_consistency",
        "temporal_flickering",
        "warping_error",
        "dynamic_degree",
        "flow_magnitude",
        "frechet_distance",
    }
    assert str(folders["dino"]) in metrics["extractors"]["subject_consistency"]
    assert str(folders["clip"]) in metrics["extractors"]["background_consistency"]
    assert str(folders["dino"]) in metrics["extractors"]["frechet_distance"]
    frechet = metrics["metrics"]["frechet_distance"]
    assert frechet["clips"] == 5 and frechet["reference_clips"] == 3
    assert frechet["value"] > 0 and "256" in frechet["warning"]
    assert "RAFT" in metrics["metrics"]["dynamic_degree"]["note"]
    assert set(metrics["timings_s"]) >= {"decode", "features", "flow"}

    rows = read_rows(out / "per_video.csv")
    assert set(rows) == {"fast.mp4", "loop.gif", "moving.mp4", "shuffled.mp4", "still"}
    assert int(rows["still"]["frames"]) == 6 and int(rows["moving.mp4"]["frames"]) == 17
    assert float(rows["still"]["subject_consistency"]) == pytest.approx(1.0, abs=1e-6)
    assert float(rows["still"]["temporal_flickering"]) == 1.0
    assert float(rows["still"]["dynamic_degree"]) == 0.0
    assert float(rows["fast.mp4"]["dynamic_degree"]) == 1.0
    assert float(rows["fast.mp4"]["flow_magnitude"]) == pytest.approx(5.0, rel=0.15)
    assert float(rows["shuffled.mp4"]["warping_error"]) > 5 * float(rows["moving.mp4"]["warping_error"])
    # the aggregate of the consistency is VBench's pair-weighted mean of the per-clip values
    pairs = {name: int(row["frames"]) - 1 for name, row in rows.items()}
    weighted = sum(float(rows[n]["subject_consistency"]) * p for n, p in pairs.items()) / sum(pairs.values())
    assert metrics["metrics"]["subject_consistency"]["value"] == pytest.approx(weighted, rel=1e-9)
    assert_real_png(out / "distributions.png")


def test_motion_is_always_reported_next_to_consistency_and_runs_compare(folders):
    run_a = folders["root"] / "compare_a"
    run_b = folders["root"] / "compare_b"
    for out, shift in ((run_a, None), (run_b, "--flow=farneback")):
        args = [str(folders["videos"]), "--metrics", "temporal_flickering,warping_error", "--out", str(out)]
        result = run_eval(*args, *([shift] if shift else []))
        assert result.exit_code == 0, result.output
    metrics = json.loads((run_a / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"temporal_flickering", "warping_error", "dynamic_degree", "flow_magnitude"}

    write_layer_report(run_a, {"base": [0.9, 0.8, 0.7], "lora": [0.95, 0.9, 0.85]}, cknna={"lora": 0.4})
    comparison = folders["root"] / "comparison"
    result = runner.invoke(app, ["eval", "--compare", str(run_a), str(run_b), "--out", str(comparison)])
    assert result.exit_code == 0, result.output
    content = json.loads((comparison / "comparison.json").read_text())
    assert list(content["runs"]) == ["compare_a", "compare_b"]
    assert any("flow methods" in note for note in content["notes"])
    with (comparison / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    flicker_a = next(r for r in rows if r["run"] == "compare_a" and r["metric"] == "temporal_flickering")
    assert float(flicker_a["value"]) == pytest.approx(metrics["temporal_flickering"]["value"])
    assert_real_png(comparison / "comparison.png")
    assert_real_png(comparison / "comparison_layers.png")
    assert_real_png(run_a / "layers.png")


def test_a_folder_without_unreadable_files_mentions_no_skipped_files(folders):
    out = folders["root"] / "all_readable"
    result = run_eval(str(folders["reference"]), "--metrics", "flow_magnitude", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "3 clips evaluated" in result.output and "skipped" not in result.output
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) == {"flow_magnitude"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a", "b", "--out", "x"], "add --compare"),
        (["{videos}", "--metrics", "frechet_distance", "--out", "x"], "--reference"),
        (["{videos}", "--metrics", "sharpness", "--out", "x"], "unknown metric"),
        (["{root}/missing", "--out", "x"], "VIDEOS_DIR {root}/missing is not a directory"),
        (
            ["{videos}", "--reference", "{root}/nofolder", "--out", "x"],
            "--reference {root}/nofolder is not a directory",
        ),
        (["{videos}", "--extractor", "flow_magnitude=dino", "--out", "x"], "uses no extractor"),
        (["--compare", "{videos}", "{root}", "--out", "x"], "no metrics.json or layers.json"),
    ],
)
def test_bad_invocations_exit_with_a_clear_message(folders, args, message):
    formatted = [arg.format(videos=folders["videos"], root=folders["root"]) for arg in args]
    result = run_eval(*formatted)
    assert result.exit_code == 2
    assert message.format(root=folders["root"]) in " ".join(result.output.split())


def test_report_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    report.write_json(target, {"value": 1.0})

    def crash(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write_json(target, {"value": float("nan"), "other": 2})
    assert json.loads(target.read_text()) == {"value": 1.0}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left behind


def write_foreign_files(folder: Path) -> dict[str, str]:
    """One file of each kind a user's folder may hold next to its clips; returns name -> reason part."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("a text file with a video extension\n" * 20)
    with av.open(str(folder / "audio.mp4"), "w") as container:  # an audio stream only
        stream = container.add_stream("aac", rate=16000)
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cv2.imwrite(str(folder / "photo.png"), textured_image(32, 32, seed=5))
    (folder / "photo.png").rename(folder / "photo.mp4")  # a single still image
    write_video(folder / "whole.mp4", translating_clip(9, 32, 32, (1, 0), seed=6), fps=8)
    whole = (folder / "whole.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index at the end: cut away
    (folder / "whole.mp4").unlink()
    # a GIF whose logical screen claims 65535 x 65535 pixels, with no image data behind it
    (folder / "huge.gif").write_bytes(
        b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\xf7\x00\x00" + bytes(800)
    )
    return {
        "zero.mp4": "empty file (0 bytes)",
        "notes.mp4": "not a readable video",
        "audio.mp4": "no video stream",
        "photo.mp4": "a still image",
        "truncated.mp4": "not a readable video",
        "huge.gif": "decoding failed",
    }


def test_eval_of_a_mixed_folder_evaluates_readable_clips_and_lists_the_others(tmp_path):
    folder = tmp_path / "mixed"
    expected = write_foreign_files(folder)
    write_video(folder / "a.mp4", translating_clip(9, 32, 32, (1, 0)), fps=8)
    write_video(folder / "b.mp4", translating_clip(9, 32, 32, (2, 0), seed=1), fps=8)
    (folder / "a.txt").write_bytes("un caf\xe9 br\xfblant".encode("latin-1"))  # not UTF-8
    (folder / "b.txt").write_bytes("na\xefve \u2013 dash".encode("utf-16"))  # with a byte-order mark
    out = tmp_path / "out"

    result = run_eval(str(folder), "--metrics", "temporal_flickering", "--out", str(out))

    assert result.exit_code == 0, result.output
    rows = read_rows(out / "per_video.csv")
    assert set(rows) == {"a.mp4", "b.mp4"}
    assert rows["a.mp4"]["caption"] == "un café brûlant" and rows["b.mp4"]["caption"] == "naïve \u2013 dash"
    for name in ("a.mp4", "b.mp4"):  # VBench's formula, a naive loop over the decoded frames
        frames, _ = read_video_frames(folder / name)
        naive = np.mean(
            [np.abs(frames[t + 1].astype(float) - frames[t]).mean() for t in range(len(frames) - 1)]
        )
        assert float(rows[name]["temporal_flickering"]) == pytest.approx((255 - naive) / 255, rel=1e-9)
    with (out / "skipped.csv").open() as handle:
        skipped = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert set(skipped) == set(expected)
    for name, reason in expected.items():
        assert skipped[name]["set"] == "videos" and skipped[name]["problem"] == "unreadable clip"
        assert reason in skipped[name]["detail"], (name, skipped[name]["detail"])
        assert f"{folder / name}: unreadable clip: {reason}" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clips"] == 2 and metrics["metrics"]["temporal_flickering"]["count"] == 2
    assert {Path(item["path"]).name for item in metrics["skipped"]} == set(expected)
    assert "skipped.csv" in metrics["files"]


def test_eval_of_a_latin1_manifest_skips_its_bad_lines(tmp_path):
    folder = tmp_path / "samples"
    write_video(folder / "clips" / "one.mp4", translating_clip(9, 32, 32, (1, 0)), fps=8)
    lines = [
        json.dumps({"file": "clips/one.mp4", "prompt": "\u00e9t\u00e9"}, ensure_ascii=False),
        "{not json",
        json.dumps({"prompt": "no file entry"}),
        json.dumps({"file": "clips/missing.mp4", "prompt": "gone"}),
    ]
    (folder / "samples.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    out = tmp_path / "out"

    result = run_eval(str(folder), "--metrics", "temporal_flickering", "--out", str(out))

    assert result.exit_code == 0, result.output
    assert read_rows(out / "per_video.csv")["one.mp4"]["caption"] == "été"
    with (out / "skipped.csv").open() as handle:
        skipped = {row["path"]: row for row in csv.DictReader(handle)}
    manifest = folder / "samples.jsonl"
    assert (
        skipped[f"{manifest}:2"]["problem"] == "bad row"
        and "invalid JSON" in skipped[f"{manifest}:2"]["detail"]
    )
    assert "'file'" in skipped[f"{manifest}:3"]["detail"]
    assert skipped[str(folder / "clips/missing.mp4")]["detail"] == "file not found"
    assert len(skipped) == 3


def test_eval_with_no_readable_clip_exits_2_with_one_line(tmp_path):
    folder = tmp_path / "broken"
    expected = write_foreign_files(folder)
    out = tmp_path / "out"

    result = run_eval(str(folder), "--metrics", "temporal_flickering", "--out", str(out))

    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"none of its {len(expected)} clip(s) could be read" in errors[0]
    assert str(out / "skipped.csv") in errors[0]
    with (out / "skipped.csv").open() as handle:
        assert {Path(row["path"]).name for row in csv.DictReader(handle)} == set(expected)
