"""The demo's synthetic video world: textured shapes that move, spin, bounce and occlude each other.

Everything is a function of a seed. A clip is a :class:`ClipSpec` (background and objects with
shape, colour, pattern and motion); :func:`render_clip` draws it (2x supersampled, area-averaged)
and :func:`write_world` writes each split as mp4 files with same-name ``.txt`` captions, the
dataset format users give to ``crepa precompute``. Splits:

- ``generic``: what the base model is pre-trained on; never a dotted star, never a bounce;
- ``attribute``: the user's data for fine-tuning: a dotted star that bounces (unseen by the base
  model), sometimes with a generic object passing in front of or behind it;
- ``heldout``: more clips of the attribute split's kind, never trained on; their captions are the
  evaluation prompts and the clips are the real reference;
- ``probe`` (rendered, not written): generic and user clips alternating, the training data of the
  evaluation's extractors (:mod:`crepa.demo.extractor`).

Clips are 25 frames (7 latent frames at 4x temporal compression). A second object often crosses
the first (in front of it, mostly), so an object disappears for a few frames and re-appears: the
situation in which a video model can lose an object's identity.

Captions use only words of the tiny tokenizer (``crepa.models.tiny_pipelines``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from crepa.cache.atomic import atomic_write_json
from crepa.demo.artefacts import build_once
from crepa.io.video import write_video

SHAPES = ("square", "circle", "star")
PATTERNS = ("plain", "stripe", "dot")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 52, 40),
    "green": (64, 190, 72),
    "blue": (62, 112, 232),
    "yellow": (236, 212, 52),
    "white": (236, 236, 236),
    "orange": (242, 142, 32),
    "purple": (152, 72, 204),
    "pink": (242, 122, 182),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
GENERIC_MOTIONS = ("moves", "rotates")
USER_SHAPE, USER_PATTERN, USER_MOTION = "star", "dot", "bounces"
SPLITS = ("generic", "attribute", "heldout")  # written as mp4 + txt
PROBE = "probe"  # rendered only, to train the evaluation's extractors: generic and user clips alternate
LABELS: tuple[str, ...] = (*SHAPES, *COLOURS, *PATTERNS)  # per-frame attribute labels (multi-hot)
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "texture": PATTERNS,
}
MAX_OBJECTS = 2
# Clip-level motion labels (multi-hot): what the caption says each object does.
MOTION_LABELS: tuple[str, ...] = (
    *(f"{USER_MOTION} {d}" for d in ("left", "right")),
    *(f"moves {d}" for d in DIRECTIONS),
    "rotates",
)
SUPERSAMPLE = 2
# Lossless H.264: x264's lossy decisions vary from process to process (measured: the same frames
# encoded in two demo runs decoded differently), lossless output decodes to the same frames always.
LOSSLESS_CRF = 0
CROSSING = 0.75  # a second object crosses the first ...
OCCLUDER_IN_FRONT = 0.7  # ... and passes in front of it (the first disappears, then re-appears)
WORLD_FILE = "world.json"  # the clip specs
WORLD_VERSION = 3  # bump when rendering, encoding or captions change


@dataclass(frozen=True)
class WorldSettings:
    """Size of the world: frames are ``size`` x ``size`` pixels, ``num_frames`` long (1 + 4k)."""

    seed: int = 0
    size: int = 32
    num_frames: int = 25
    fps: float = 8.0
    clips: dict[str, int] = field(
        default_factory=lambda: {"generic": 512, "attribute": 64, "heldout": 24, PROBE: 256}
    )
    second_object: float = 0.6  # probability of a second object in a clip


@dataclass(frozen=True)
class ObjectSpec:
    """One object: appearance, and where it is at frame t (pixels of the output frame).

    Position: (x0, y0) + t * (vx, vy); a bouncing object adds -height * |sin(pi * (t + phase) / period)|
    to y. Angle: angle0 + t * spin (radians).
    """

    shape: str
    colour: str
    pattern: str
    motion: str
    direction: str
    radius: float
    x0: float
    y0: float
    vx: float
    vy: float
    angle0: float
    spin: float
    bounce_height: float = 0.0
    bounce_period: float = 1.0
    bounce_phase: float = 0.0

    def position(self, t: float) -> tuple[float, float]:
        x, y = self.x0 + t * self.vx, self.y0 + t * self.vy
        if self.motion == USER_MOTION:
            y -= self.bounce_height * abs(math.sin(math.pi * (t + self.bounce_phase) / self.bounce_period))
        return x, y

    def caption(self) -> str:
        pattern = "" if self.pattern == "plain" else f"{self.pattern} "
        where = "" if self.motion == "rotates" else f" {self.direction}"
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {pattern}{self.shape} {self.motion}{where}"


@dataclass(frozen=True)
class ClipSpec:
    """A clip: name, split, a two-colour background with a static texture, objects back to front."""

    name: str
    split: str
    background_top: tuple[int, int, int]
    background_bottom: tuple[int, int, int]
    texture_seed: int
    objects: tuple[ObjectSpec, ...]

    @property
    def caption(self) -> str:
        return " and ".join(obj.caption() for obj in reversed(self.objects))  # front object first


def _random_object(
    rng: np.random.Generator, size: int, frames: int, user: bool, motion: str | None = None
) -> ObjectSpec:
    """A random object; ``user`` gives the user's dotted bouncing star, else a generic object
    (with ``motion`` when given). Speeds are per frame, drawn as a travel over the whole clip."""
    if user:
        shape, pattern, motion = USER_SHAPE, USER_PATTERN, USER_MOTION
    else:
        motion = motion or str(rng.choice(GENERIC_MOTIONS))
        while True:  # a dotted star belongs to the user's attribute only
            shape, pattern = str(rng.choice(SHAPES)), str(rng.choice(PATTERNS))
            if (shape, pattern) != (USER_SHAPE, USER_PATTERN):
                break
    colour = str(rng.choice(list(COLOURS)))
    radius = float(rng.uniform(0.2, 0.27) * size)
    span = frames - 1
    if motion == "rotates":
        direction = str(rng.choice(list(DIRECTIONS)))
        speed = float(rng.uniform(0.0, 0.1)) * size / span
        spin = float(rng.choice([-1, 1]) * rng.uniform(0.06, 0.12))
    else:
        direction = str(rng.choice(["left", "right"] if motion == USER_MOTION else list(DIRECTIONS)))
        travel = (0.3, 0.5) if motion == USER_MOTION else (0.35, 0.6)
        speed = float(rng.uniform(*travel)) * size / span
        spin = float(rng.uniform(-0.015, 0.015))
    dx, dy = DIRECTIONS[direction]
    vx, vy = dx * speed, dy * speed
    margin = radius * 0.6
    # Start so that the whole path stays inside the frame (up to ``margin``).
    x0 = float(rng.uniform(margin - min(0, vx * span), size - margin - max(0, vx * span)))
    bounce_height = float(rng.uniform(0.25, 0.4) * size) if motion == USER_MOTION else 0.0
    low = margin + bounce_height - min(0, vy * span)
    y0 = float(rng.uniform(min(low, size - margin), size - margin - max(0, vy * span)))
    return ObjectSpec(
        shape=shape,
        colour=colour,
        pattern=pattern,
        motion=motion,
        direction=direction,
        radius=radius,
        x0=x0,
        y0=y0,
        vx=vx,
        vy=vy,
        angle0=float(rng.uniform(0, 2 * math.pi)),
        spin=spin,
        bounce_height=bounce_height,
        bounce_period=float(rng.uniform(0.3, 0.45) * span),  # two to three hops per clip
        bounce_phase=float(rng.uniform(0, 0.3) * span),
    )


def _crossing_object(rng: np.random.Generator, target: ObjectSpec, size: int, frames: int) -> ObjectSpec:
    """A generic moving object whose path crosses ``target`` in the middle third of the clip, so one
    hides the other for a few frames and it re-appears (the identity has to survive the occlusion)."""
    crosser = _random_object(rng, size, frames, user=False, motion="moves")
    dx, dy = DIRECTIONS[crosser.direction]
    speed = float(rng.uniform(0.9, 1.2)) * size / (frames - 1)  # faster than a wanderer: a brief crossing
    meet = float(rng.uniform(0.35, 0.65) * (frames - 1))
    x, y = target.position(meet)
    jitter = rng.uniform(-0.2, 0.2, size=2) * target.radius
    vx, vy = dx * speed, dy * speed
    return replace(crosser, vx=vx, vy=vy, x0=x + jitter[0] - vx * meet, y0=y + jitter[1] - vy * meet)


def clip_spec(settings: WorldSettings, split: str, index: int) -> ClipSpec:
    """Clip ``index`` of ``split``, a pure function of (seed, split, index).

    One or two objects; a second object crosses the first with probability ``CROSSING``, in front of
    it with probability ``OCCLUDER_IN_FRONT`` (else behind), otherwise it goes its own way.
    """
    rng = np.random.default_rng([settings.seed, (*SPLITS, PROBE).index(split), index])
    dark = rng.uniform(10, 70, size=3)
    top = tuple(int(v) for v in np.clip(dark + rng.uniform(-25, 25, size=3), 0, 90))
    bottom = tuple(int(v) for v in np.clip(dark + rng.uniform(-25, 25, size=3), 0, 90))
    user = split in ("attribute", "heldout") or (split == PROBE and index % 2 == 1)
    main = _random_object(rng, settings.size, settings.num_frames, user=user)
    objects = [main]
    if rng.random() < settings.second_object:
        if rng.random() < CROSSING:
            other = _crossing_object(rng, main, settings.size, settings.num_frames)
            objects = [main, other] if rng.random() < OCCLUDER_IN_FRONT else [other, main]
        else:
            other = _random_object(rng, settings.size, settings.num_frames, user=False)
            objects = [main, other] if rng.random() < 0.5 else [other, main]
    return ClipSpec(
        name=f"{split}-{index:04d}",
        split=split,
        background_top=top,  # type: ignore[arg-type]
        background_bottom=bottom,  # type: ignore[arg-type]
        texture_seed=int(rng.integers(2**31)),
        objects=tuple(objects),
    )


def world_specs(settings: WorldSettings) -> dict[str, list[ClipSpec]]:
    """Every clip of every split."""
    return {split: [clip_spec(settings, split, i) for i in range(settings.clips[split])] for split in SPLITS}


def _background(spec: ClipSpec, side: int) -> np.ndarray:
    """Vertical two-colour gradient plus a smooth static texture: float (side, side, 3) in 0..255."""
    ramp = np.linspace(0.0, 1.0, side)[:, None, None]
    top, bottom = np.asarray(spec.background_top, float), np.asarray(spec.background_bottom, float)
    gradient = np.broadcast_to((1 - ramp) * top + ramp * bottom, (side, side, 3))
    coarse = np.random.default_rng(spec.texture_seed).uniform(-14, 14, size=(5, 5))
    axis = np.linspace(0, 4, side)
    rows = np.stack([np.interp(axis, np.arange(5), line) for line in coarse])  # (5, side)
    texture = np.stack([np.interp(axis, np.arange(5), column) for column in rows.T]).T  # (side, side)
    return gradient + texture[..., None]


def _object_layer(
    obj: ObjectSpec, frames: int, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mask (T, S, S) bool and colours (T, S, S, 3) of ``obj`` in every frame on sample coordinates
    xs, ys (S, S)."""
    t = np.arange(frames, dtype=np.float64)
    centres = np.array([obj.position(float(step)) for step in t])  # (T, 2)
    cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]
    angle = (obj.angle0 + t * obj.spin)[:, None, None]
    cos, sin = np.cos(angle), np.sin(angle)
    u = cos * (xs - cx) + sin * (ys - cy)  # object-local coordinates (they rotate with it)
    v = -sin * (xs - cx) + cos * (ys - cy)
    r = obj.radius
    if obj.shape == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    elif obj.shape == "circle":
        mask = u * u + v * v <= r * r
    else:  # a five-pointed star: radius between r / 2 and r, peaking at the points
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        tooth = np.abs(((5 * phi / (2 * math.pi)) % 1.0) * 2 - 1)  # 1 at a point, 0 between points
        mask = rho <= r * (0.5 + 0.5 * tooth)
    base = np.asarray(COLOURS[obj.colour], float)
    dark = base * 0.4
    if obj.pattern == "stripe":
        width = r / 2.2
        marked = np.floor(u / width) % 2 == 0
    elif obj.pattern == "dot":
        pitch = r / 1.25
        du, dv = (u % pitch) - pitch / 2, (v % pitch) - pitch / 2
        marked = du * du + dv * dv <= (0.33 * pitch) ** 2
    else:
        marked = np.zeros_like(mask)
    colours = np.where(marked[..., None], dark, base)
    return mask, colours


@dataclass(frozen=True)
class RenderedClip:
    """frames: uint8 (T, H, W, 3); visibility: (T, objects) visible pixels of each object (not
    occluded, inside the frame) over half the area of a disc of its radius, capped at 1."""

    frames: np.ndarray
    visibility: np.ndarray


def render_clip(spec: ClipSpec, settings: WorldSettings) -> RenderedClip:
    """Draw ``spec``: objects back to front over the background, 2x supersampled then area-averaged
    (every frame at once)."""
    side, count = settings.size * SUPERSAMPLE, settings.num_frames
    coords = (np.arange(side) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    canvas = np.repeat(_background(spec, side)[None], count, axis=0)  # (T, S, S, 3)
    owner = np.full((count, side, side), -1)
    for index, obj in enumerate(spec.objects):
        mask, colours = _object_layer(obj, count, xs, ys)
        canvas = np.where(mask[..., None], colours, canvas)
        owner[mask] = index
    visibility = np.zeros((count, len(spec.objects)))
    for index, obj in enumerate(spec.objects):
        area = math.pi * (obj.radius * SUPERSAMPLE) ** 2  # a disc of its radius
        visibility[:, index] = np.minimum(1.0, (owner == index).sum(axis=(1, 2)) / (0.5 * area))
    small = canvas.reshape(count, settings.size, SUPERSAMPLE, settings.size, SUPERSAMPLE, 3).mean(axis=(2, 4))
    return RenderedClip(np.clip(np.round(small), 0, 255).astype(np.uint8), visibility)


def frame_labels(spec: ClipSpec, visibility: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Multi-hot attributes per frame (T, len(LABELS)): shape, colour and pattern of every object
    at least ``threshold`` visible."""
    labels = np.zeros((visibility.shape[0], len(LABELS)), np.float32)
    for index, obj in enumerate(spec.objects):
        seen = visibility[:, index] >= threshold
        for name in (obj.shape, obj.colour, obj.pattern):
            labels[seen, LABELS.index(name)] = 1.0
    return labels


def frame_counts(visibility: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Objects at least ``threshold`` visible per frame: int (T,) from visibility (T, objects)."""
    return (visibility >= threshold).sum(axis=1)


def motion_label(obj: ObjectSpec) -> str:
    """The object's entry of :data:`MOTION_LABELS` (its caption's verb, with the direction if it travels)."""
    return "rotates" if obj.motion == "rotates" else f"{obj.motion} {obj.direction}"


def caption_labels(spec: ClipSpec) -> np.ndarray:
    """What the caption says every frame shows: multi-hot (len(LABELS),) of every object's attributes."""
    labels = np.zeros(len(LABELS), np.float32)
    for obj in spec.objects:
        for name in (obj.shape, obj.colour, obj.pattern):
            labels[LABELS.index(name)] = 1.0
    return labels


def motion_labels(spec: ClipSpec) -> np.ndarray:
    """Multi-hot (len(MOTION_LABELS),) of the motions in the caption."""
    labels = np.zeros(len(MOTION_LABELS), np.float32)
    for obj in spec.objects:
        labels[MOTION_LABELS.index(motion_label(obj))] = 1.0
    return labels


@dataclass(frozen=True)
class World:
    """A written world: ``root/<split>/<name>.mp4`` + ``.txt`` for every spec."""

    root: Path
    settings: WorldSettings
    specs: dict[str, list[ClipSpec]]

    def split_dir(self, split: str) -> Path:
        return self.root / split


@dataclass(frozen=True)
class SplitArrays:
    """A split rendered from its specs (no decoding): clips uint8 (N, T, H, W, 3), attribute labels
    (N, T, len(LABELS)), visible-object counts (N, T) and caption motions (N, len(MOTION_LABELS))."""

    clips: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    motions: np.ndarray


def split_arrays(settings: WorldSettings, split: str) -> SplitArrays:
    """Every clip of ``split`` rendered, with its ground truth."""
    clips, labels, counts, motions = [], [], [], []
    for index in range(settings.clips[split]):
        spec = clip_spec(settings, split, index)
        rendered = render_clip(spec, settings)
        clips.append(rendered.frames)
        labels.append(frame_labels(spec, rendered.visibility))
        counts.append(frame_counts(rendered.visibility))
        motions.append(motion_labels(spec))
    return SplitArrays(np.stack(clips), np.stack(labels), np.stack(counts), np.stack(motions))


class RenderedSplit:
    """A split's clips and ground truth, rendered on first use (cached artefacts may not need them)."""

    def __init__(self, settings: WorldSettings, split: str) -> None:
        self.settings, self.split = settings, split

    @functools.cached_property
    def arrays(self) -> SplitArrays:
        return split_arrays(self.settings, self.split)

    @property
    def clips(self) -> np.ndarray:
        """uint8 (N, T, H, W, 3)."""
        return self.arrays.clips

    @property
    def frames(self) -> np.ndarray:
        """Every frame of every clip, uint8 (N * T, H, W, 3)."""
        return self.clips.reshape(-1, *self.clips.shape[2:])

    @property
    def labels(self) -> np.ndarray:
        """Attribute labels of :attr:`frames`, (N * T, len(LABELS))."""
        return self.arrays.labels.reshape(-1, len(LABELS))

    @property
    def counts(self) -> np.ndarray:
        """Visible objects in each of :attr:`frames`, (N * T,)."""
        return self.arrays.counts.reshape(-1)

    @property
    def motions(self) -> np.ndarray:
        """Caption motions of each clip, (N, len(MOTION_LABELS))."""
        return self.arrays.motions


def write_world(root: str | Path, settings: WorldSettings, progress: bool = True) -> tuple[World, bool]:
    """Write every split under ``root`` (mp4 + caption per clip, ``world.json`` with the specs),
    unless the same settings were written there before; returns (world, reused)."""
    root = Path(root)
    specs = world_specs(settings)

    def build(staging: Path) -> None:
        total = sum(len(clips) for clips in specs.values())
        with tqdm(total=total, desc="world", unit="clip", disable=not progress) as bar:
            for split, clips in specs.items():
                for spec in clips:
                    rendered = render_clip(spec, settings)
                    path = staging / split / f"{spec.name}.mp4"
                    write_video(path, rendered.frames, fps=settings.fps, crf=LOSSLESS_CRF)
                    (staging / split / f"{spec.name}.txt").write_text(spec.caption + "\n", encoding="utf-8")
                    bar.update(1)
        document = {split: [asdict(spec) for spec in clips] for split, clips in specs.items()}
        atomic_write_json(staging / WORLD_FILE, document)

    reused = build_once(root, {"world": asdict(settings), "version": WORLD_VERSION}, build)
    return World(root, settings, specs), reused
