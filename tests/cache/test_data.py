"""Video input on real files written here: exact frame sampling, buckets, and bad inputs reported, never fatal."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from rich.console import Console

from crepa.data import (
    ClipTooShortError,
    DataReport,
    SamplingConfig,
    available_frame_count,
    choose_frame_bucket,
    choose_resolution_bucket,
    iter_decoded,
    load_sample,
    resize_center_crop,
    sample_frame_indices,
    scan_dataset,
    uniform_timestamps,
)
from crepa.data.sources import read_text
from crepa.io.video import VideoDecodeError, decode_frames, probe_video, video_backend, write_video

BLOCK = 8  # frame-number code: one 8x8 block per bit along the top row, white = 1


def make_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a diagonal gradient moving by 3 px per frame, frame number coded in the top row."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    wave = 0.5 + 0.5 * np.sin((x + y + 3 * t) / 6.0)
    frames = np.stack([wave * 200, wave[:, ::-1] * 150 + 50, np.full_like(wave, 90)], axis=-1).astype(
        np.uint8
    )
    for bit in range(width // BLOCK):
        on = ((np.arange(num_frames) >> bit) & 1).astype(bool)
        frames[:, :BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = np.where(on[:, None, None, None], 255, 0)
    return frames


def read_frame_numbers(frames: np.ndarray) -> list[int]:
    """Frame numbers coded by :func:`make_frames` in decoded (T, H, W, 3) uint8 frames."""
    bits = frames.shape[2] // BLOCK
    centres = frames[:, BLOCK // 2, BLOCK // 2 :: BLOCK][:, :bits].mean(axis=-1) > 128  # (T, bits)
    return (centres * (1 << np.arange(bits))).sum(axis=1).tolist()


def write_faststart_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """An mp4 with its index (moov) before the data, so a truncated copy still opens."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt, stream.width, stream.height = "yuv420p", frames.shape[2], frames.shape[1]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# 30 fps -> 16 fps: target time k/16 s is source frame 30k/16 = 1.875k, rounded to nearest (ties to
# the earlier frame: 7.5 -> 7, 22.5 -> 22, 37.5 -> 37).
INDICES_30_TO_16 = [0, 2, 4, 6, 7, 9, 11, 13, 15, 17, 19, 21, 22, 24, 26, 28, 30, 32, 34, 36, 37]

CONFIG = SamplingConfig(
    target_fps=16,
    frame_buckets=(5, 9, 13, 17),
    resolution_buckets=((32, 48), (48, 32), (32, 32)),
    temporal_ratio=4,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good clips and one of each kind of bad input."""
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "wide.mp4", make_frames(40, 48, 64), fps=30)  # 1.33 s, 4:3 landscape
    write_video(root / "tall.mp4", make_frames(30, 64, 48), fps=24)  # 1.25 s, portrait
    write_video(root / "sub" / "square.mp4", make_frames(12, 40, 40), fps=12)  # 1.0 s, in a subfolder
    for name, caption in [("wide", "a wide clip"), ("tall", "a tall clip\n"), ("sub/square", "square")]:
        (root / f"{name}.txt").write_text(caption)
    good = (root / "wide.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])  # index at the end: unreadable
    write_faststart_mp4(root / "cut.mp4", make_frames(40, 48, 64), fps=30)
    (root / "cut.mp4").write_bytes((root / "cut.mp4").read_bytes()[:-300])  # index first: last frames cut
    (root / "zero.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file with a video extension\n" * 20)
    cv2.imwrite(str(root / "picture.png"), make_frames(1, 48, 64)[0])
    (root / "picture.png").rename(root / "picture.mp4")
    write_video(root / "uncaptioned.mp4", make_frames(20, 48, 64), fps=30)
    write_video(root / "blank.mp4", make_frames(20, 48, 64), fps=30)
    write_video(root / "short.mp4", make_frames(4, 48, 64), fps=30)  # 3 frames at 16 fps, smallest bucket 5
    for name in ("truncated", "cut", "zero", "notes", "picture", "short"):
        (root / f"{name}.txt").write_text(f"caption of {name}")
    (root / "blank.txt").write_text("  \n")
    (root / "orphan.txt").write_text("a caption whose video is gone")
    return root


EXPECTED_PROBLEMS = {
    "truncated.mp4": "unreadable video: not a readable video",
    "cut.mp4": "unreadable video: truncated or damaged file",
    "zero.mp4": "unreadable video: empty file (0 bytes)",
    "notes.mp4": "unreadable video: not a readable video",
    "picture.mp4": "unreadable video: a still image",
    "uncaptioned.mp4": "missing caption",
    "blank.mp4": "empty caption",
    "short.mp4": "too short",
    "orphan.txt": "caption without video",
}


def test_hand_computed_indices_from_timestamps() -> None:
    assert sample_frame_indices(uniform_timestamps(40, 30.0), 21, target_fps=16) == INDICES_30_TO_16
    # start 0.25 s, every 2nd frame at 16 fps: times 0.25 + k/8 -> source frames 7.5, 11.25, 15, 18.75, 22.5
    assert sample_frame_indices(uniform_timestamps(40, 30.0), 5, 16, stride=2, start=0.25) == [
        7,
        11,
        15,
        19,
        22,
    ]
    # the source's own frames: first frame at or after 0.1 s is frame 3, then every 3rd
    assert sample_frame_indices(uniform_timestamps(40, 30.0), 4, None, stride=3, start=0.1) == [3, 6, 9, 12]
    # upsampling repeats frames: 8 fps -> 16 fps, frame i at i/8 s; times k/16 -> 0, 0.5 (tie: 0), 1, 1.5 (1), ...
    assert sample_frame_indices(uniform_timestamps(8, 8.0), 5, 16) == [0, 0, 1, 1, 2]


def test_available_frames_and_too_short() -> None:
    timestamps = uniform_timestamps(40, 30.0)  # covers 40/30 s: 16 fps times k/16 < 4/3 -> k <= 21
    assert available_frame_count(timestamps, 16) == 22
    assert available_frame_count(timestamps, None, stride=3) == 14  # frames 0, 3, ..., 39
    assert available_frame_count(timestamps, 16, start=2.0) == 0
    with pytest.raises(ClipTooShortError, match="needs 23 frames, the clip supplies 22"):
        sample_frame_indices(timestamps, 23, 16)


def test_variable_frame_rate_clip_is_sampled_by_its_timestamps(tmp_path: Path) -> None:
    """Frames at 0..9 then 12, 15, ..., 39 (units of 1/30 s): the container's average fps (~16.7) is
    no guide; sampling at 10 fps follows the real times."""
    pts = [*range(10), *range(12, 40, 3)]
    frames = make_frames(len(pts), 32, 48)
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.pix_fmt, stream.width, stream.height = "yuv420p", 48, 32
        stream.codec_context.time_base = Fraction(1, 30)
        for stamp, array in zip(pts, frames, strict=True):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    probe = probe_video(path)
    np.testing.assert_allclose(probe.timestamps * 30, pts, atol=1e-6)
    # 10 fps: times 3k/30; covers 42/30 s -> 14 frames; bucket 13 = 1 + 4*3
    assert available_frame_count(probe.timestamps, 10) == 14
    indices = sample_frame_indices(probe.timestamps, 13, 10)
    assert indices == [0, 3, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    decoded, times = decode_frames(probe, indices, backend="pyav")
    assert read_frame_numbers(decoded) == indices
    np.testing.assert_allclose(times * 30, [pts[i] for i in indices], atol=1e-6)


def test_buckets() -> None:
    assert choose_frame_bucket(22, (5, 9, 13, 17, 21, 25)) == 21
    assert choose_frame_bucket(4, (5, 9)) is None
    buckets = [(480, 720), (480, 480), (720, 480)]
    assert choose_resolution_bucket((1080, 1920), buckets) == (480, 720)
    assert choose_resolution_bucket((1920, 1080), buckets) == (720, 480)
    assert choose_resolution_bucket((500, 560), buckets) == (480, 480)


def test_resize_center_crop_keeps_the_aspect() -> None:
    """Columns of a 32x64 ramp (value = column): covering 16x16 halves the size to 16x32, then the
    centre 16 columns are kept; resized column c averages source columns 2c and 2c+1."""
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None], (2, 32, 64, 3)).copy()
    out = resize_center_crop(ramp, (16, 16))
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expected_columns = (2 * np.arange(8, 24) + 0.5) / 255
    np.testing.assert_allclose(out[0, 0].numpy(), np.broadcast_to(expected_columns, (16, 16)), atol=1e-5)


def test_sampling_config_checks_frame_counts() -> None:
    with pytest.raises(ValueError, match=r"16 frames is not 1 \+ 4\*m.*17"):
        SamplingConfig(frame_buckets=(16,), temporal_ratio=4)
    assert SamplingConfig(frame_buckets=(17, 9, 9)).frame_buckets == (9, 17)


def test_scan_folder_uses_good_clips_and_reports_every_bad_input(
    dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="crepa.data"):
        samples, report = scan_dataset(dataset, CONFIG)
    by_name = {sample.path.name: sample for sample in samples}
    assert sorted(by_name) == ["square.mp4", "tall.mp4", "wide.mp4"]
    assert sorted(Path(path).name for path in report.used) == sorted(by_name)
    assert by_name["tall.mp4"].caption == "a tall clip"
    skipped = {Path(entry.path).name: entry.reason for entry in report.skipped}
    assert sorted(skipped) == sorted(EXPECTED_PROBLEMS)
    for name, problem in EXPECTED_PROBLEMS.items():
        assert skipped[name].startswith(problem), (name, skipped[name])
        assert any(name in record.getMessage() for record in caplog.records), name
    assert "the smallest bucket needs 5" in skipped["short.mp4"]
    summary = report.summary()
    assert summary.startswith("3 used, 9 skipped")
    assert all(name in summary for name in EXPECTED_PROBLEMS)
    console = Console(file=io.StringIO(), width=250)
    console.print(report.table())
    table_text = console.file.getvalue()
    assert all(name in table_text for name in EXPECTED_PROBLEMS)

    # Buckets: 16 fps; wide 40 frames at 30 fps and tall 30 at 24 fps supply 21 and 20 -> 17; square
    # 12 at 12 fps supplies 16 -> 13. Aspect: 48x64 -> 32x48, 64x48 -> 48x32, 40x40 -> 32x32.
    assert by_name["wide.mp4"].frame_indices == tuple(INDICES_30_TO_16[:17])
    assert (by_name["wide.mp4"].num_frames, by_name["wide.mp4"].size) == (17, (32, 48))
    assert (by_name["tall.mp4"].num_frames, by_name["tall.mp4"].size) == (17, (48, 32))
    assert (by_name["square.mp4"].num_frames, by_name["square.mp4"].size) == (13, (32, 32))
    # tall: 24 -> 16 fps, times k/16 -> frames 1.5k: 0, 1.5 (1), 3, 4.5 (4), 6, ...
    assert by_name["tall.mp4"].frame_indices[:6] == (0, 1, 3, 4, 6, 7)


def test_decoded_frames_are_the_sampled_ones(dataset: Path) -> None:
    samples, report = scan_dataset(dataset, CONFIG)
    wide = next(sample for sample in samples if sample.path.name == "wide.mp4")
    raw, times = decode_frames(wide.probe, wide.frame_indices, backend="pyav")
    assert read_frame_numbers(raw) == INDICES_30_TO_16[:17]
    np.testing.assert_allclose(times, np.asarray(INDICES_30_TO_16[:17]) / 30, atol=1e-6)

    decoded = list(iter_decoded(samples, report))
    assert len(decoded) == 3
    for sample, (frames, caption, meta) in decoded:
        assert frames.shape == (sample.num_frames, 3, *sample.size) and frames.dtype == torch.float32
        assert frames.min() >= 0 and frames.max() <= 1
        assert caption == sample.caption and meta["path"] == str(sample.path)
    frames_u8, _, _ = load_sample(wide, output="uint8")
    assert frames_u8.shape == (17, 32, 48, 3) and frames_u8.dtype == torch.uint8
    float_frames = decoded[[s.path.name for s, _ in decoded].index("wide.mp4")][1].frames
    assert torch.equal(frames_u8, float_frames.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1))


def test_decoding_checks_timestamps_against_the_index(dataset: Path) -> None:
    probe = probe_video(dataset / "wide.mp4")
    lying = dataclasses.replace(probe, timestamps=probe.timestamps * 2)
    with pytest.raises(VideoDecodeError, match="container index says"):
        decode_frames(lying, [0, 5], backend="pyav")
    with pytest.raises(VideoDecodeError, match="has 40 frames"):
        decode_frames(probe, [40], backend="pyav")


def test_file_failing_at_decode_time_is_skipped_and_reported(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clips"
    shutil.copytree(dataset, copy)
    samples, report = scan_dataset(copy, CONFIG)
    (copy / "tall.mp4").unlink()
    decoded = [sample.path.name for sample, _ in iter_decoded(samples, report)]
    assert sorted(decoded) == ["square.mp4", "wide.mp4"]
    assert report.reason(copy / "tall.mp4") == "missing file: file not found"
    assert str(copy / "tall.mp4") not in report.used
    assert report.summary().startswith("2 used, 10 skipped")


def test_csv_and_jsonl_tables(dataset: Path, tmp_path: Path) -> None:
    table_dir = tmp_path / "meta"
    table_dir.mkdir()
    rows = [
        {"video": "../clips/wide.mp4", "caption": "relative path"},
        {"video": str(dataset / "tall.mp4"), "caption": "absolute path"},
        {"video": "../clips/gone.mp4", "caption": "missing file"},
        {"video": "../clips/wide.mp4", "caption": ""},
    ]
    shutil.copytree(dataset, tmp_path / "clips")
    jsonl = table_dir / "data.jsonl"
    jsonl.write_text("\n".join([*map(json.dumps, rows), "{not json", json.dumps({"caption": "no video"})]))
    samples, report = scan_dataset(jsonl, CONFIG)
    assert [(s.path.name, s.caption) for s in samples] == [
        ("wide.mp4", "relative path"),
        ("tall.mp4", "absolute path"),
    ]
    assert report.reason(table_dir / "../clips/gone.mp4") == "missing file: file not found"
    assert report.reason(f"{jsonl}:5").startswith("bad row: invalid JSON")
    assert report.reason(f"{jsonl}:6") == "bad row: no 'video' value"
    assert [entry.problem for entry in report.skipped].count("empty caption") == 1

    csv_file = table_dir / "data.csv"
    csv_file.write_text('clip,text\n../clips/wide.mp4,"a caption, with a comma"\n../clips/zero.mp4,zero\n')
    samples, report = scan_dataset(csv_file, CONFIG, video_column="clip", caption_column="text")
    assert [s.caption for s in samples] == ["a caption, with a comma"]
    assert report.reason(table_dir / "../clips/zero.mp4") == "unreadable video: empty file (0 bytes)"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption', 'video'\]"):
        scan_dataset(csv_file, CONFIG)


def test_backend_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    video_backend.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="crepa.io.video"):
        first, second = video_backend("auto"), video_backend("auto")
    assert first == second in ("pyav", "torchcodec")
    assert [
        (record.levelno, record.getMessage().startswith("video decoding:")) for record in caplog.records
    ] == [(logging.DEBUG, True)]


def test_report_counts() -> None:
    report = DataReport()
    report.use("a.mp4")
    report.skip("b.mp4", "too short", "3 frames")
    report.skip("c.mp4", "too short")
    assert report.problem_counts() == {"too short": 2}
    assert report.summary().splitlines()[:2] == ["1 used, 2 skipped", "  too short: 2"]


def test_caption_bom_is_dropped(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the caption."""
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "clip.mp4", make_frames(20, 48, 64), fps=30)
    (folder / "clip.txt").write_bytes("\ufeffa red car".encode())
    (tmp_path / "list.csv").write_bytes(f"\ufeffvideo,caption\n{folder / 'clip.mp4'},a blue car\n".encode())
    (tmp_path / "list.jsonl").write_bytes(
        ("\ufeff" + json.dumps({"video": str(folder / "clip.mp4"), "caption": "a green car"}) + "\n").encode()
    )
    for source, caption in (
        (folder, "a red car"),
        (tmp_path / "list.csv", "a blue car"),
        (tmp_path / "list.jsonl", "a green car"),
    ):
        samples, _ = scan_dataset(source, CONFIG)
        assert [sample.caption for sample in samples] == [caption], source


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("caf\u00e9 \u2013 cr\u00e8me".encode("utf-8"), "caf\u00e9 \u2013 cr\u00e8me"),
        (b"\xef\xbb\xbf" + "na\u00efve".encode("utf-8"), "na\u00efve"),  # UTF-8 byte-order mark dropped
        ("na\u00efve \u2013 dash".encode("utf-16"), "na\u00efve \u2013 dash"),
        ("wide \U0001f600".encode("utf-32"), "wide \U0001f600"),
        (b"caf\xe9 \x96 cr\xe8me", "caf\u00e9 \u2013 cr\u00e8me"),  # Windows-1252: 0x96 is an en dash
        (b"caf\xe9 \x81", "caf\u00e9 \x81"),  # 0x81 is undefined in Windows-1252: Latin-1
    ],
)
def test_caption_and_table_files_are_read_in_any_encoding(tmp_path, data, text):
    path = tmp_path / "caption.txt"
    path.write_bytes(data)
    assert read_text(path) == text


def test_dataset_listings_read_latin1_captions_and_tables(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "clips")
    (tmp_path / "clips/wide.txt").write_bytes("un caf\u00e9".encode("latin-1"))
    table = tmp_path / "data.csv"
    table.write_bytes("video,caption\nclips/tall.mp4,cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    samples, _ = scan_dataset(tmp_path / "clips", CONFIG)
    assert {s.path.name: s.caption for s in samples}["wide.mp4"] == "un caf\u00e9"
    samples, _ = scan_dataset(table, CONFIG)
    assert [s.caption for s in samples] == ["cr\u00e8me br\u00fbl\u00e9e"]
