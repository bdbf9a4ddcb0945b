"""Dataset listings: a folder of videos with same-name .txt captions, or a CSV / JSONL table."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from crepa.data.report import DataReport
from crepa.io.video import is_image

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg"})


@dataclass(frozen=True)
class SourceEntry:
    """One listed sample: a video path and its caption (not yet checked)."""

    video: Path
    caption: str


def list_source(
    source: str | os.PathLike,
    report: DataReport,
    video_column: str = "video",
    caption_column: str = "caption",
) -> list[SourceEntry]:
    """Entries of a folder (recursive, sorted) or a ``.csv`` / ``.jsonl`` table (paths relative to it).

    Unusable entries (a video without caption, a caption without video, a malformed row) go to
    ``report``; a missing source or missing table columns raise ``ValueError``.
    """
    source = Path(source)
    if source.is_dir():
        return _list_folder(source, report)
    if not source.is_file():
        raise ValueError(f"dataset source {source} does not exist")
    if source.suffix.lower() == ".csv":
        return _list_csv(source, report, video_column, caption_column)
    if source.suffix.lower() == ".jsonl":
        return _list_jsonl(source, report, video_column, caption_column)
    raise ValueError(f"dataset source {source}: expected a folder, a .csv or a .jsonl file")


def _list_folder(folder: Path, report: DataReport) -> list[SourceEntry]:
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    # still images are listed too: one-frame clips, kept where the source's num_frames holds 1
    videos = [path for path in files if path.suffix.lower() in VIDEO_EXTENSIONS or is_image(path)]
    video_stems = {path.with_suffix("") for path in videos}
    for caption in files:
        if caption.suffix.lower() == ".txt" and caption.with_suffix("") not in video_stems:
            report.skip(caption, "caption without video", "no video file with the same name")
    entries = []
    for video in videos:
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            report.skip(video, "missing caption", f"{caption_file.name} not found")
            continue
        try:
            entries.append(SourceEntry(video, caption_file.read_text(encoding="utf-8-sig")))
        except (OSError, UnicodeDecodeError) as error:
            report.skip(video, "unreadable caption", f"{caption_file.name}: {error}")
    return entries


def _row_entry(
    table: Path, row: dict, where: str, report: DataReport, video_column: str, caption_column: str
) -> SourceEntry | None:
    video = row.get(video_column)
    if not isinstance(video, str) or not video.strip():
        report.skip(where, "bad row", f"no {video_column!r} value")
        return None
    caption = row.get(caption_column)
    return SourceEntry(table.parent / video.strip(), caption if isinstance(caption, str) else "")


def _list_csv(table: Path, report: DataReport, video_column: str, caption_column: str) -> list[SourceEntry]:
    with table.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {video_column, caption_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{table}: missing column(s) {sorted(missing)}; columns found: {reader.fieldnames}"
            )
        rows = [(f"{table}:{reader.line_num}", row) for row in reader]
    entries = [_row_entry(table, row, where, report, video_column, caption_column) for where, row in rows]
    return [entry for entry in entries if entry is not None]


def _list_jsonl(table: Path, report: DataReport, video_column: str, caption_column: str) -> list[SourceEntry]:
    entries = []
    for number, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{table}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            report.skip(where, "bad row", f"invalid JSON ({error.msg})")
            continue
        if not isinstance(row, dict):
            report.skip(where, "bad row", "not a JSON object")
            continue
        entry = _row_entry(table, row, where, report, video_column, caption_column)
        if entry is not None:
            entries.append(entry)
    return entries
