"""Read and write video files: PyAV (it bundles FFmpeg, so it works on any machine) and torchcodec.

Frames are uint8 arrays (T, H, W, 3), RGB. Reading is timestamp-aware: :func:`probe_video` lists
the presentation time of every frame from the container's packets (stated frame counts and fps
can lie), :func:`decode_frames` decodes chosen frames by index and checks their timestamps.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

logger = logging.getLogger(__name__)

VideoBackend = Literal["auto", "torchcodec", "pyav"]
# FFmpeg demuxers that read still images: such a file is a picture, whatever its extension says.
_IMAGE_FORMATS = ("image2", "_pipe")


class VideoDecodeError(ValueError):
    """A video file cannot be used; ``reason`` says why in a few words (the message adds the path)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class VideoProbe:
    """What the container's packets say about a video's first stream, without decoding it all.

    Compared by identity (it holds an array).

    timestamps: (N,) float64 presentation times in seconds of every readable frame, ascending.
    stated_frames / stated_fps: the container's own claims (0 when absent); they may be wrong.
    """

    path: Path
    timestamps: np.ndarray
    height: int
    width: int
    codec: str
    stated_frames: int
    stated_fps: float

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def frame_interval(self) -> float:
        """Median spacing of the timestamps in seconds (1 / measured fps); 0 for a single frame."""
        return float(np.median(np.diff(self.timestamps))) if self.num_frames > 1 else 0.0

    @property
    def fps(self) -> float:
        """Frame rate measured from the timestamps (the stated one when there is a single frame)."""
        interval = self.frame_interval
        return 1.0 / interval if interval > 0 else self.stated_fps


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "file not found")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    _check_file(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoDecodeError(path, f"not a readable video ({_ffmpeg_message(error)})") from error
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream in the file")
    if any(marker in container.format.name for marker in _IMAGE_FORMATS):
        container.close()
        raise VideoDecodeError(path, f"a still image ({container.format.name}), not a video")
    return container


def _ffmpeg_message(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Timestamps of every frame of the first video stream, read from its packets; the first frame is decoded.

    Raises :class:`VideoDecodeError` for a missing, empty, unreadable or undecodable file.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        times, first_frame_decoded = [], False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if packet.is_corrupt:
                    stated = f" of {stream.frames}" if stream.frames else ""
                    raise VideoDecodeError(
                        path, f"truncated or damaged file: frame {len(times) + 1}{stated} is incomplete"
                    )
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    raise VideoDecodeError(path, "packets carry no timestamps")
                times.append(float(stamp * packet.time_base))
                if not first_frame_decoded:
                    first_frame_decoded = bool(codec.decode(packet))
        except av.error.FFmpegError as error:
            raise VideoDecodeError(path, f"damaged video stream ({_ffmpeg_message(error)})") from error
        if not first_frame_decoded:
            try:
                first_frame_decoded = bool(codec.decode(None))  # flush: decoders with a delay
            except av.error.FFmpegError as error:
                raise VideoDecodeError(path, f"cannot decode ({_ffmpeg_message(error)})") from error
        if not times or not first_frame_decoded:
            raise VideoDecodeError(path, "no decodable video frames")
        return VideoProbe(
            path=path,
            timestamps=np.sort(np.asarray(times, dtype=np.float64)),
            height=int(codec.height),
            width=int(codec.width),
            codec=codec.name,
            stated_frames=int(stream.frames or 0),
            stated_fps=float(stream.average_rate) if stream.average_rate else 0.0,
        )


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
IMAGE_CODEC = "image"  # VideoProbe.codec of a still image read as a one-frame clip


def is_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a still image (by extension): a one-frame clip for the families that take one."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def probe_clip(path: str | os.PathLike) -> VideoProbe:
    """:func:`probe_video` for a video; for an image, a one-frame clip (timestamp 0, codec "image")."""
    if not is_image(path):
        return probe_video(path)
    height, width, _ = _decode_image(Path(path)).shape
    return VideoProbe(Path(path), np.zeros(1), height, width, IMAGE_CODEC, stated_frames=1, stated_fps=0.0)


def _decode_image(path: Path) -> np.ndarray:
    """A still image as (H, W, 3) uint8 RGB, through FFmpeg's image decoders (PyAV)."""
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError, StopIteration) as error:
        raise VideoDecodeError(path, f"not a readable image ({_ffmpeg_message(error)})") from error


def _decoded(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """Decoded frames of the container's first video stream, in presentation order."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container.decode(stream)


@functools.cache
def video_backend(preferred: VideoBackend = "auto") -> str:
    """The decoder that :func:`decode_frames` uses: "torchcodec" when it imports and its FFmpeg
    libraries load, else "pyav". The choice is logged once, at debug level: both decode through FFmpeg
    under the same timestamp checks, so it is no news to a user (a torchcodec failure is a warning)."""
    if preferred == "pyav":
        logger.debug("video decoding: PyAV %s (requested)", av.__version__)
        return "pyav"
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads the FFmpeg libraries)
    except Exception as error:  # ImportError, or RuntimeError when no FFmpeg library loads
        if preferred == "torchcodec":
            raise RuntimeError(f"torchcodec was requested but cannot be used: {error}") from error
        logger.debug("video decoding: PyAV %s (torchcodec unavailable: %s)", av.__version__, error)
        return "pyav"
    logger.debug("video decoding: torchcodec %s", getattr(torchcodec, "__version__", "?"))
    return "torchcodec"


def decode_frames(
    probe: VideoProbe, indices: Sequence[int], backend: VideoBackend = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``indices`` (positions in ``probe.timestamps``) as (N, H, W, 3) uint8 RGB, and their
    decoded timestamps (N,) in seconds.

    Every decoded frame's timestamp is checked against the probe; a short, damaged or inconsistent
    file raises :class:`VideoDecodeError`. A torchcodec failure is retried with PyAV.
    """
    if len(indices) == 0:
        raise ValueError("no frame indices to decode")
    if max(indices) >= probe.num_frames or min(indices) < 0:
        raise VideoDecodeError(
            probe.path, f"frame index {max(indices)} requested, the video has {probe.num_frames} frames"
        )
    if probe.codec == IMAGE_CODEC:  # the one frame of a still image (index 0, checked above)
        return _decode_image(probe.path)[None], np.zeros(1)
    if video_backend(backend) == "torchcodec":
        try:
            return _checked(probe, indices, *_decode_torchcodec(probe.path, indices))
        except Exception as error:
            logger.warning("%s: torchcodec failed (%s); decoding with PyAV", probe.path, error)
    return _checked(probe, indices, *_decode_pyav(probe.path, indices))


def _decode_pyav(path: Path, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    wanted, last = set(indices), max(indices)
    kept: dict[int, tuple[np.ndarray, float]] = {}
    decoded = 0
    try:
        with _open(path) as container:
            for position, frame in enumerate(_decoded(container)):
                decoded = position + 1
                if position in wanted:
                    time = frame.time if frame.time is not None else float("nan")
                    kept[position] = (frame.to_ndarray(format="rgb24"), time)
                if position == last:
                    break
    except av.error.FFmpegError as error:
        raise VideoDecodeError(
            path, f"decoding failed after {decoded} frames ({_ffmpeg_message(error)})"
        ) from error
    if decoded <= last:
        raise VideoDecodeError(path, f"only {decoded} frames could be decoded, frame {last} was needed")
    frames = np.stack([kept[index][0] for index in indices])
    return frames, np.asarray([kept[index][1] for index in indices])


def _decode_torchcodec(path: Path, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC")
    batch = decoder.get_frames_at(indices=list(indices))
    return batch.data.numpy(), batch.pts_seconds.double().numpy()


def _checked(
    probe: VideoProbe, indices: Sequence[int], frames: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check decoded frames against the probe (count, size, timestamps within half a frame)."""
    expected = probe.timestamps[np.asarray(indices)]
    tolerance = 0.5 * probe.frame_interval + 1e-6
    if frames.shape != (len(indices), probe.height, probe.width, 3):
        raise VideoDecodeError(
            probe.path, f"decoded frames have shape {frames.shape}, expected {probe.height}x{probe.width}"
        )
    known = ~np.isnan(times)
    off = np.abs(times[known] - expected[known]) > tolerance
    if off.any():
        position = int(np.flatnonzero(known)[np.argmax(off)])
        raise VideoDecodeError(
            probe.path,
            f"decoded frame {indices[position]} is at {times[position]:.4f}s, the container index "
            f"says {expected[position]:.4f}s",
        )
    return frames, np.where(known, times, expected)


def read_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All decoded frames of ``path`` as (T, H, W, 3) uint8 RGB, and the stream's average fps.

    Raises :class:`VideoDecodeError` for a missing, empty, unreadable or undecodable file."""
    path = Path(path)
    frames: list[np.ndarray] = []
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        try:
            frames.extend(frame.to_ndarray(format="rgb24") for frame in _decoded(container))
        except av.error.FFmpegError as error:
            raise VideoDecodeError(
                path, f"decoding failed after {len(frames)} frames ({_ffmpeg_message(error)})"
            ) from error
    if not frames:
        raise VideoDecodeError(path, "no video frames could be decoded")
    return np.stack(frames), fps


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames as an H.264 mp4 (or GIF by extension), atomically.

    Height and width must be even for yuv420p mp4.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        _encode(tmp, frames, fps, crf, gif=path.suffix.lower() == ".gif")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encode(path: str, frames: np.ndarray, fps: float, crf: int, gif: bool) -> None:
    from fractions import Fraction

    height, width = frames.shape[1:3]
    with av.open(path, mode="w") as container:
        if gif:
            stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1000))
            stream.pix_fmt = "rgb8"
        else:
            if height % 2 or width % 2:
                raise ValueError(f"mp4 (yuv420p) needs even height and width, got {height}x{width}")
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
        stream.width, stream.height = width, height
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
