"""Dataset listings: a folder of videos with same-name .txt captions, or a CSV / JSONL table."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from crepa.data.report import DataReport
from crepa.io.video import is_image

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg"})
# Byte-order marks and the codec each one means; UTF-32 first (its LE mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
logger = logging.getLogger("crepa.data")


def read_text(path: str | os.PathLike) -> str:
    """A caption or table file as text, whatever its encoding.

    The encoding a byte-order mark names, else UTF-8, else Windows-1252 (a superset of Latin-1's
    printable characters), else Latin-1, which decodes any bytes; a fallback is logged. Statistical
    detection (charset_normalizer) is not used: on a one-line caption it guesses wrong (Latin-1
    "café" comes back as cp1006).
    """
    data = Path(path).read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        pass
    try:
        text, fallback = data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # one of the five bytes Windows-1252 leaves undefined
        text, fallback = data.decode("latin-1"), "Latin-1"
    logger.warning("%s is not valid %s; read as %s", path, encoding, fallback)
    return text


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
            entries.append(SourceEntry(video, read_text(caption_file)))
        except OSError as error:
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
    reader = csv.DictReader(io.StringIO(read_text(table), newline=""))
    missing = {video_column, caption_column} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{table}: missing column(s) {sorted(missing)}; columns found: {reader.fieldnames}")
    rows = [(f"{table}:{reader.line_num}", row) for row in reader]
    entries = [_row_entry(table, row, where, report, video_column, caption_column) for where, row in rows]
    return [entry for entry in entries if entry is not None]


def _list_jsonl(table: Path, report: DataReport, video_column: str, caption_column: str) -> list[SourceEntry]:
    entries = []
    for number, line in enumerate(read_text(table).splitlines(), start=1):
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
