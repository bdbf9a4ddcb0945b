"""Generating clips with a family's diffusers pipeline: the one path behind training validation and
``crepa sample``.

A clip is fixed by its :class:`ClipRequest` (prompt, seed, optional first frame) and the
:class:`GenerationSettings`; its starting noise comes from a CPU ``torch.Generator`` seeded with the
request's seed, so a request starts from the same noise on any device and in any batch position.
Generated alone on the CPU, the clip is bitwise reproducible; batched (or on a GPU) it agrees to
float tolerance, since matrix products may sum in another order.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crepa.align.grids import valid_frame_counts_near
from crepa.cache.atomic import atomic_write_bytes
from crepa.config import ModelSection, ValidationSection
from crepa.io.video import write_video
from crepa.models import ModelFamily
from crepa.models.hub import hub_access
from crepa.models.memory import block_streamer
from crepa.models.pipelines import _DTYPE_KWARG, own_components_accepted, text_length

SAMPLES_FILE = "samples.jsonl"
CONTACT_SHEET = "contact_sheet.png"
# What the user changes to set each clip dimension, in the run file and on the command line.
VALIDATION_KEYS = {
    "num_frames": "validation.num_frames",
    "height": "validation.height",
    "width": "validation.width",
}
SAMPLE_OPTIONS = {"num_frames": "--frames", "height": "--height", "width": "--width"}


@dataclass(frozen=True)
class GenerationSettings:
    """How every clip of one call is generated (a run's ``[validation]`` section by default)."""

    num_frames: int
    height: int
    width: int
    inference_steps: int
    guidance_scale: float
    fps: float
    negative_prompt: str | None = None

    @classmethod
    def from_validation(cls, section: ValidationSection, **overrides: Any) -> GenerationSettings:
        """The run's validation settings, with any non-None ``overrides`` (field name -> value)."""
        settings = cls(
            num_frames=section.num_frames,
            height=section.height,
            width=section.width,
            inference_steps=section.inference_steps,
            guidance_scale=section.guidance_scale,
            fps=section.fps,
        )
        return replace(settings, **{key: value for key, value in overrides.items() if value is not None})


def shape_problems(
    family: ModelFamily, transformer: nn.Module, settings: GenerationSettings, names: Mapping[str, str]
) -> list[str]:
    """What keeps the model from generating clips of ``settings``' frame count, height and width,
    one message each naming the limit and ``names[field]``, the key or option to change (never
    silently rounded). ``transformer`` may be a skeleton on the meta device: only its config is read.

    Frame counts must encode to whole latent frames (1 + r*m for a causal VAE, r*m otherwise) in
    whole temporal patches; height and width must be multiples of VAE stride x patch size; and the
    token grid must fit the rotary position table where the family has one.
    """
    ratio, count = family.temporal_ratio, settings.num_frames
    patch_t, patch_h, patch_w = family.patch_sizes(transformer)
    frames_key = names["num_frames"]
    problems = []
    if family.causal_vae and (count - 1) % ratio:
        near = " or ".join(map(str, valid_frame_counts_near(count, ratio, latent_multiple=patch_t)))
        problems.append(f"{frames_key}: the model generates 1 + {ratio}*m frames, not {count}; use {near}")
    elif not family.causal_vae and count % (ratio * patch_t):
        near = max(1, round(count / (ratio * patch_t))) * ratio * patch_t
        problems.append(
            f"{frames_key}: the model generates a multiple of {ratio * patch_t} frames, not {count}; use {near}"
        )
    elif family.causal_vae and (1 + (count - 1) // ratio) % patch_t:
        near = " or ".join(map(str, valid_frame_counts_near(count, ratio, latent_multiple=patch_t)))
        problems.append(
            f"{frames_key}: {count} frames give {1 + (count - 1) // ratio} latent frames, but the model "
            f"patches {patch_t} latent frames per token; use {near}"
        )
    multiples = {"height": family.spatial_ratio * patch_h, "width": family.spatial_ratio * patch_w}
    for field, multiple in multiples.items():
        value = getattr(settings, field)
        if value % multiple:
            near = max(1, round(value / multiple)) * multiple
            problems.append(
                f"{names[field]}: {value} is not a multiple of {multiple} (VAE stride x patch size); use {near}"
            )
    limit = family.max_tokens_per_axis(transformer)
    if limit is None or problems:
        return problems
    latent_frames = 1 + (count - 1) // ratio if family.causal_vae else count // ratio
    most_latent = limit * patch_t
    most = {
        "num_frames": 1 + ratio * (most_latent - 1) if family.causal_vae else ratio * most_latent,
        **{field: limit * multiple for field, multiple in multiples.items()},
    }
    tokens = {
        "num_frames": latent_frames // patch_t,
        "height": settings.height // multiples["height"],
        "width": settings.width // multiples["width"],
    }
    for field, count_along in tokens.items():
        if count_along > limit:
            problems.append(
                f"{names[field]}: {getattr(settings, field)} needs {count_along} positions along that axis, "
                f"more than the transformer's rotary table holds ({family.rotary_table_key} = {limit}); "
                f"use at most {most[field]}"
            )
    return problems


@dataclass(frozen=True)
class ClipRequest:
    """One clip to generate: ``prompt`` from the noise of ``seed``; ``image`` is the first frame (I2V)."""

    prompt: str
    seed: int
    image: Path | None = None


@dataclass(frozen=True)
class GeneratedClip:
    """A generated clip, uint8 (T, H, W, 3) with even H and W, and the request it answers."""

    request: ClipRequest
    frames: np.ndarray


def load_pipeline(
    model: ModelSection,
    family: ModelFamily,
    transformer: nn.Module,
    *,
    device: str | torch.device | None = None,
    offload: bool = False,
    vae_tiling: bool = False,
    **components: Any,
):
    """The family's diffusers pipeline from ``model.pretrained`` around ``transformer`` (as it is:
    LoRA, RepVideo hooks and all), in the transformer's dtype, on ``device`` (the transformer's).
    A transformer placed by ``model.offload_blocks`` (:func:`crepa.models.memory.offload_blocks`)
    stays as it is: its offloaded blocks stream to the device as they run; the other components move.

    offload: diffusers' model CPU offload: text encoder, transformer and VAE wait on the CPU and move
    to the GPU only while they run (needs an accelerator device). vae_tiling: decode in tiles.
    ``components`` replace pipeline parts (e.g. a VAE class diffusers cannot import by name).
    """
    parameter = next(transformer.parameters())
    streamer = block_streamer(transformer)
    if offload and streamer is not None:
        raise ValueError(
            "offload: this transformer streams its blocks already (model.offload_blocks); diffusers' "
            "CPU offload would move every hosted block to the GPU at once (drop offload)"
        )
    pipeline_class = getattr(diffusers, family.pipeline_class)
    with hub_access(model.pretrained, "model.pretrained"), own_components_accepted():
        pipeline = pipeline_class.from_pretrained(
            model.pretrained,
            **{model.expert or "transformer": transformer},  # Wan 2.2 A14B: the trained expert's slot
            revision=model.revision,
            **{_DTYPE_KWARG: parameter.dtype},
            **components,
        )
    if device is None:
        device = streamer.device if streamer is not None else parameter.device
    device = torch.device(device)
    if offload:
        if device.type == "cpu":
            raise ValueError(
                "offload: CPU offload moves models between the CPU and a GPU; this run is on the CPU "
                "already (drop --offload, or pass --device cuda)"
            )
        pipeline.enable_model_cpu_offload(device=device)
    elif streamer is not None:
        # not pipeline.to: it would move the hosted weights of every offloaded block to the device,
        # all at once and for good (out of memory on exactly the runs that need offload)
        for component in pipeline.components.values():
            if isinstance(component, nn.Module) and block_streamer(component) is None:
                component.to(device)
    else:
        pipeline.to(device)
    if vae_tiling:
        if not hasattr(pipeline.vae, "enable_tiling"):
            raise ValueError(f"vae_tiling: {type(pipeline.vae).__name__} cannot decode in tiles")
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _call_options(pipeline, family: ModelFamily, settings: GenerationSettings) -> dict[str, Any]:
    """Keyword arguments of ``pipeline.__call__`` that not every family's pipeline takes."""
    accepted = inspect.signature(pipeline.__call__).parameters
    options: dict[str, Any] = {}
    if "max_sequence_length" in accepted:  # CogVideoX's positional embeddings fix the text length
        options["max_sequence_length"] = text_length(family, pipeline.transformer.config)
    if settings.negative_prompt is not None:
        if "negative_prompt" not in accepted:
            raise ValueError(f"negative_prompt: {type(pipeline).__name__} takes no negative prompt")
        options["negative_prompt"] = settings.negative_prompt
    return options


def _images(pipeline, batch: Sequence[ClipRequest]) -> dict[str, Any]:
    """``image=`` for the batch's first frames (all or none of the requests have one)."""
    paths = [request.image for request in batch]
    if all(path is None for path in paths):
        return {}
    if any(path is None for path in paths):
        raise ValueError("images: give a first frame for every prompt or for none")
    if "image" not in inspect.signature(pipeline.__call__).parameters:
        raise ValueError(
            f"images: {type(pipeline).__name__} generates from text only; this family has no "
            "image-to-video pipeline in crepa (drop --images)"
        )
    from PIL import Image  # pillow comes with diffusers

    images = [Image.open(path).convert("RGB") for path in paths if path is not None]
    return {"image": images[0] if len(images) == 1 else images}


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1], (T, H, W, 3) float -> uint8, cropped to even H and W (for mp4)."""
    clip = (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)
    return clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]


@torch.no_grad()
def generate_clips(
    pipeline,
    family: ModelFamily,
    requests: Sequence[ClipRequest],
    settings: GenerationSettings,
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> Iterator[GeneratedClip]:
    """Generate one clip per request, ``batch_size`` requests per pipeline call, in request order.

    When a batch runs out of GPU memory, the batch size is halved and the batch retried (down to
    one clip per call, which then raises). The transformer is in eval mode for the call, restored after.
    """
    experts = [m for m in (pipeline.transformer, getattr(pipeline, "transformer_2", None)) if m is not None]
    transformer = next((model for model in experts if model.training), experts[0])  # the one being trained
    was_training = transformer.training
    transformer.eval()
    options = _call_options(pipeline, family, settings)
    bar = tqdm(total=len(requests), desc="sample", unit="clip", disable=not progress)
    start = 0
    try:
        while start < len(requests):
            batch = list(requests[start : start + batch_size])
            try:
                output = _call(pipeline, batch, settings, options)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                message = f"out of memory: {len(batch)} clips per call is too many, trying {batch_size}"
                bar.write(message, file=sys.stderr)  # a diagnostic: stdout carries the command's output
                continue
            for request, frames in zip(batch, output.frames, strict=True):
                yield GeneratedClip(request, to_uint8(frames))
                bar.update(1)
            start += len(batch)
    finally:
        bar.close()
        transformer.train(was_training)


def _call(pipeline, batch: list[ClipRequest], settings: GenerationSettings, options: dict[str, Any]):
    """One pipeline call for ``batch``: one CPU generator per clip, seeded with its seed."""
    generators = [torch.Generator(device="cpu").manual_seed(request.seed) for request in batch]
    return pipeline(
        prompt=[request.prompt for request in batch] if len(batch) > 1 else batch[0].prompt,
        num_frames=settings.num_frames,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=generators if len(batch) > 1 else generators[0],
        output_type="np",
        **_images(pipeline, batch),
        **options,
    )


def sheet_frames(count: int, columns: int = 8) -> np.ndarray:
    """Indices of the ``min(columns, count)`` evenly spaced frames a contact sheet row shows."""
    return np.linspace(0, count - 1, num=min(columns, count)).round().astype(int)


def contact_sheet(clips: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """One image (rows = clips, columns = evenly spaced frames) from uint8 clips (T, H, W, 3)."""
    height, width = clips[0].shape[1:3]
    rows = []
    for clip in clips:
        picks = sheet_frames(len(clip), columns)
        row = np.zeros((height, width * columns, 3), dtype=np.uint8)
        for slot, index in enumerate(picks):
            row[:, slot * width : (slot + 1) * width] = clip[index][:height, :width]
        rows.append(row)
    return np.concatenate(rows, axis=0)


def write_contact_sheet(path: Path, clips: list[np.ndarray]) -> Path:
    """:func:`contact_sheet` of ``clips`` as a PNG, written atomically."""
    import cv2  # only needed here

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(contact_sheet(clips), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the contact sheet")
    return atomic_write_bytes(path, encoded.tobytes())


def write_clips(
    directory: Path,
    clips: Iterable[tuple[str, GeneratedClip]],
    settings: GenerationSettings,
    extra: dict[str, Any] | None = None,
    crf: int = 18,
) -> Path:
    """Write each (stem, clip) as ``stem.mp4`` (H.264 at ``crf``; 0 is lossless) + ``stem.gif`` as it
    arrives, then a contact sheet and ``samples.jsonl``; returns the manifest's path.

    ``samples.jsonl`` has one line per clip: file (the mp4, relative to ``directory``), gif, prompt,
    seed, image, settings, ``frames_sha256`` (of the uint8 frames before encoding) and ``extra``
    (e.g. run directory and checkpoint). ``crepa eval`` reads it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    records, sheet_rows = [], []
    for stem, clip in clips:
        write_video(directory / f"{stem}.mp4", clip.frames, fps=settings.fps, crf=crf)
        write_video(directory / f"{stem}.gif", clip.frames, fps=settings.fps)
        request = clip.request
        records.append(
            {
                "file": f"{stem}.mp4",
                "gif": f"{stem}.gif",
                "prompt": request.prompt,
                "seed": request.seed,
                "image": None if request.image is None else str(request.image),
                "settings": asdict(settings),
                "frames_sha256": frames_digest(clip.frames),
                **(extra or {}),
            }
        )
        sheet_rows.append(clip.frames[sheet_frames(len(clip.frames))])  # not every frame: memory
    if sheet_rows:
        write_contact_sheet(directory / CONTACT_SHEET, sheet_rows)
    return write_records(directory / SAMPLES_FILE, records)


def frames_digest(frames: np.ndarray) -> str:
    """sha256 of uint8 frames (T, H, W, 3) and their shape: equal digests mean bitwise-equal clips."""
    import hashlib

    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """JSON lines, written atomically."""
    return atomic_write_bytes(path, "".join(json.dumps(record) + "\n" for record in records).encode())
