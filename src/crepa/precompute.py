"""``crepa precompute``: VAE latents, text embeddings and teacher grids of every clip, computed once.

For each usable sample of ``data.source`` (see :func:`crepa.data.scan_dataset`) three parts are
stored in the cache (``cache.dir``), each under a key of everything it depends on
(:mod:`crepa.cache.keys`): the normalised latents, the prompt embeddings from the family's own
``encode_prompt`` and, when training aligns with an external teacher from the cache, the teacher
grid per latent frame on the student's token grid. Parts already present and intact are reused,
so a killed run resumes and a changed setting recomputes only what depends on it.

Under ``accelerate launch`` rank r takes samples i % world == r and writes its own shards; when
all ranks are done, rank 0 writes the one manifest. Ranks meet only at the start (a barrier) and
through files at the end, so no collective times out during a long run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from crepa.cache.atomic import TEMP_PREFIX, atomic_write_json
from crepa.cache.keys import (
    FileHasher,
    clip_facts,
    digest,
    latents_key,
    source_fingerprint,
    teacher_key,
    text_key,
)
from crepa.cache.manifest import SHARDS_DIR, CacheEntry, Manifest
from crepa.cache.shards import PART_KINDS, ShardIndex, ShardWriter, to_storage
from crepa.config import (
    ConfigError,
    RunConfig,
    SourceSection,
    check_against_family,
    check_optional_dependencies,
)
from crepa.data import DataReport, SamplingConfig, VideoSample, iter_decoded, scan_dataset
from crepa.lock import hold
from crepa.models.hub import hub_access
from crepa.models.image_conditioning import IMAGE_ENCODERS
from crepa.models.loading import describe_device
from crepa.models.pipelines import (
    encode_latents,
    encode_prompts,
    load_components,
    patch_sizes_from_config,
    read_transformer_config,
    resolve_family,
    student_grid,
    text_length,
)
from crepa.models.registry import ModelFamily
from crepa.models.support import check_supported
from crepa.teachers import clip_teacher_grid, detect_teacher_kind, load_teacher
from crepa.teachers.size import TEACHER_SIZE_RULE

logger = logging.getLogger("crepa.precompute")

RANKS_DIR = "ranks"
FILE_HASHES = "file_hashes.json"
_SAMPLING_KEYS = {
    "frame_buckets": "data.num_frames",
    "resolution_buckets": "data.resolutions",
    "target_fps": "data.fps",
    "stride": "data.stride",
    "start": "data.start",
}
STAGES = ("decode", "vae", "text", "teacher")
IMAGE_INPUT_FOLDERS = ("vae", "image_encoder", "image_processor")
"""Pipeline folders the latents part depends on (the image ones exist only in image-to-video pipelines)."""


@dataclass
class PrecomputeSummary:
    """What a precompute run did and what the cache holds.

    computed / reused: parts per kind computed by this run / found intact, each part once (texts: the
    distinct prompts, the empty prompt of caption dropout included); damaged: shards that
    failed verification (file -> reason; their parts were recomputed and the files deleted);
    part_bytes: tensor bytes per kind used by the entries; disk_bytes: size of the shard files the
    manifest uses; stale_shards: shard files no entry uses (deleted with ``prune``). Only rank 0's
    summary covers the whole cache; other ranks' report their own share.
    """

    cache_dir: Path
    samples: int
    computed: dict[str, int]
    reused: dict[str, int]
    damaged: dict[str, str]
    part_bytes: dict[str, int]
    disk_bytes: int
    stale_shards: list[str]
    stale_bytes: int
    pruned: bool
    report: DataReport
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    device: str = "cpu"  # where the VAE, text encoders and teacher ran

    def bytes_per_sample(self) -> dict[str, float]:
        return {kind: size / max(self.samples, 1) for kind, size in self.part_bytes.items()}

    def lines(self) -> list[str]:
        """The summary as text lines (sizes, work done, damaged and stale shards, data report)."""
        mib = 2**20
        per_sample = self.bytes_per_sample()
        sizes = ", ".join(
            f"{kind} {per_sample[kind] / mib:.3g} MiB" for kind in PART_KINDS if kind in per_sample
        )
        lines = [
            f"cache {self.cache_dir}: {self.samples} samples, {self.disk_bytes / mib:.4g} MiB on disk "
            f"({sum(per_sample.values()) / mib:.3g} MiB per sample: {sizes or 'nothing'})",
            "parts computed: "
            + _counts(self.computed)
            + "; reused: "
            + _counts(self.reused)
            + " (text: distinct prompts, the empty one included)",
            "time: "
            + ", ".join(f"{stage} {self.stage_seconds.get(stage, 0.0):.1f}s" for stage in STAGES)
            + f"; total {self.seconds:.1f}s on {self.device}",
        ]
        lines += [
            f"damaged shard recomputed and deleted: {shard}: {reason}"
            for shard, reason in self.damaged.items()
        ]
        if self.stale_shards:
            verb = "deleted" if self.pruned else "kept (crepa precompute --prune deletes them)"
            lines.append(
                f"{len(self.stale_shards)} shard(s), {self.stale_bytes / mib:.4g} MiB, hold no part of this "
                f"run: {verb}"
            )
        lines += ["data: " + self.report.summary()]
        return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {counts.get(kind, 0)}" for kind in PART_KINDS)


@dataclass
class _Plan:
    """One sample of this rank (``sample`` None for the empty prompt): its keys and the parts still to compute."""

    index: int
    sample: VideoSample | None
    grid: tuple[int, int, int]
    parts: dict[str, str]
    missing: list[str]
    caption: str
    source: int = 0  # index into data.dataset_sources()


def sampling_config(config: RunConfig, family: ModelFamily, source: SourceSection) -> SamplingConfig:
    """The data section as :class:`SamplingConfig` of one source for ``family``; errors name the
    run-file key."""
    data = config.data
    try:
        return SamplingConfig(
            target_fps=data.fps,
            frame_buckets=tuple(source.num_frames),
            resolution_buckets=tuple(tuple(size) for size in source.resolutions),
            temporal_ratio=family.temporal_ratio,
            stride=data.stride,
            start=data.start,
        )
    except ValidationError as error:
        messages = []
        for problem in error.errors():
            message = problem["msg"].removeprefix("Value error, ")
            for field_name, key in _SAMPLING_KEYS.items():
                message = message.replace(f"{field_name}:", f"{key}:")
            messages.append(message)
        raise ConfigError(f"invalid data section for {family.name}: " + "; ".join(messages)) from None


def _scan_sources(
    config: RunConfig, sampling: list[SamplingConfig]
) -> tuple[list[VideoSample], list[int], DataReport]:
    """The usable samples of every data source (captions with the source's prefix), the source index
    of each, and one report of every file; a source without a usable clip is a :class:`ConfigError`."""
    data = config.data
    samples: list[VideoSample] = []
    sample_sources: list[int] = []
    report = DataReport()
    for i, (source, settings) in enumerate(zip(data.dataset_sources(), sampling, strict=True)):
        key, buckets = (
            (f"data.sources[{i}]", "its num_frames / resolutions")
            if data.sources
            else ("data.source", "data.num_frames / data.resolutions")
        )
        try:
            found, found_report = scan_dataset(
                source.path, settings, video_column=data.video_column, caption_column=data.caption_column
            )
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
        if not found:
            raise ConfigError(
                f"{key}: no usable clip in {source.path} for {buckets} (nothing to precompute or train on); "
                f"files seen: {found_report.summary()}"
            )
        samples += [replace(sample, caption=source.caption_prefix + sample.caption) for sample in found]
        sample_sources += [i] * len(found)
        report.used += found_report.used
        report.skipped += found_report.skipped
    return samples, sample_sources, report


def uses_cached_teacher(config: RunConfig) -> bool:
    """Whether the run reads teacher grids from the cache (else precompute stores none)."""
    return config.crepa.enabled and config.crepa.mode != "backbone" and config.cache.teacher_source == "cache"


def check_settings(config: RunConfig) -> tuple[ModelFamily, dict[str, Any], list[SamplingConfig]]:
    """Family, transformer config and the sampling of each data source, from configs only (no
    weights); raises :class:`~crepa.config.ConfigError` naming the run-file key."""
    model = config.model
    try:
        with hub_access(model.pretrained, "model.pretrained"):
            family = resolve_family(model.pretrained, model.family, model.revision)
            transformer_config = read_transformer_config(model.pretrained, family, model.revision)
    except (OSError, ValueError) as error:
        key = "model.family" if model.family else "model.pretrained"
        raise ConfigError(f"{key}: {error}") from None
    check_supported(config, family)
    patch_t, patch_h, patch_w = patch_sizes_from_config(family, transformer_config)
    multiples = (family.spatial_ratio * patch_h, family.spatial_ratio * patch_w)
    check_against_family(config, family.temporal_ratio, multiples, family.causal_vae, temporal_patch=patch_t)
    sampling = [sampling_config(config, family, source) for source in config.data.dataset_sources()]
    if uses_cached_teacher(config):
        check_teacher_settings(config)
    return family, transformer_config, sampling


def check_teacher_settings(config: RunConfig) -> None:
    """teacher.name is a supported checkpoint of teacher.kind (read from its config, no weights)."""
    settings = config.teacher
    try:
        with hub_access(settings.name, "teacher.name"):
            detected = detect_teacher_kind(settings.name)
    except (OSError, ValueError) as error:
        raise ConfigError(f"teacher.name: {error}") from None
    # a DINOv2-with-registers checkpoint is a DINOv2 teacher too
    if settings.kind not in ("auto", detected) and f"{settings.kind}_with_registers" != detected:
        raise ConfigError(
            f"teacher.kind: {settings.kind!r}, but {settings.name} is a {detected} checkpoint; its weights "
            f"would not load into a {settings.kind} model. Set teacher.kind = 'auto' (or {detected!r})"
        )


def precompute(config: RunConfig, *, prune: bool = False, progress: bool = True) -> PrecomputeSummary:
    """Fill ``config.cache.dir`` for ``config.data`` (see the module docstring); returns this rank's summary
    (rank 0's covers the whole cache). Raises :class:`~crepa.config.ConfigError` for unusable settings
    before any weight is loaded."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _precompute(config, prune=prune, progress=progress)
    with hold(config.cache.dir, "cache.dir", "crepa precompute"):  # one writer per cache
        return _precompute(config, prune=prune, progress=progress)


def _precompute(config: RunConfig, *, prune: bool, progress: bool) -> PrecomputeSummary:
    started = time.perf_counter()
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: torchrun ranks form a gloo group
    check_optional_dependencies(config)
    family, transformer_config, sampling = check_settings(config)
    cache_dir = config.cache.dir
    shards_dir, ranks_dir = cache_dir / SHARDS_DIR, cache_dir / RANKS_DIR
    if state.is_main_process:
        shards_dir.mkdir(parents=True, exist_ok=True)
        for leftover in shards_dir.glob(f"{TEMP_PREFIX}*"):  # from a killed run
            leftover.unlink(missing_ok=True)
        shutil.rmtree(ranks_dir, ignore_errors=True)
    state.wait_for_everyone()
    samples, sample_sources, report = _scan_sources(config, sampling)
    scan_skips = len(report.skipped)

    dtype = config.model.torch_dtype(state.device)
    identity = CacheIdentity(config, family, transformer_config, dtype, state.device)
    index = ShardIndex(shards_dir)
    hasher = FileHasher(read_json(cache_dir / FILE_HASHES, {}))
    plans = [
        identity.plan(i, sample, hasher, index, sample_sources[i])
        for i, sample in enumerate(samples)
        if i % state.num_processes == state.process_index
    ]
    null_text = identity.text("") if state.is_main_process else None
    null_cached = null_text is not None and index.has(null_text)
    if null_text is not None and not null_cached:
        plans.append(_Plan(-1, None, (0, 0, 0), {"text": null_text}, ["text"], caption=""))
    worker = _Worker(
        config, family, plans, dtype, state.device, f"{uuid.uuid4().hex[:8]}-r{state.process_index}"
    )
    clips = sum(plan.sample is not None for plan in worker.todo)  # the empty prompt is no clip
    try:
        with _ProgressBar(
            progress and state.is_main_process and clips > 0, clips, state.num_processes
        ) as bar:
            entries = worker.run(report, bar)
    finally:
        worker.writer.flush()  # keep finished work, also when interrupted

    reused = {(kind, key) for plan in plans for kind, key in plan.parts.items() if kind not in plan.missing}
    if null_cached:  # counted as it is when computed, so that a rerun reuses what the first run computed
        reused.add(("text", null_text))
    rank_document = {
        "entries": [asdict(entry) for entry in entries],
        "decode_skips": [[item.path, item.problem, item.detail] for item in report.skipped[scan_skips:]],
        "damaged": index.damaged,
        "computed": worker.computed,
        "reused": Counter(kind for kind, _ in reused),
        "stage_seconds": worker.seconds,
        "hashes": hasher.memo,
    }
    atomic_write_json(ranks_dir / f"rank{state.process_index}.json", rank_document)
    if state.is_main_process:
        summary = _merge(config, family, identity, state.num_processes, null_text, report, prune, started)
        return replace(summary, device=describe_device(state.device))
    return PrecomputeSummary(
        cache_dir=cache_dir,
        samples=len(entries),
        computed=dict(worker.computed),
        reused=dict(rank_document["reused"]),
        damaged=dict(index.damaged),
        part_bytes={},
        disk_bytes=0,
        stale_shards=[],
        stale_bytes=0,
        pruned=prune,
        report=report,
        seconds=time.perf_counter() - started,
        stage_seconds=worker.seconds,
        rank=state.process_index,
        device=describe_device(state.device),
    )


class CacheIdentity:
    """The facts that key each part (see :mod:`crepa.cache.keys`), computed once per run from the run
    file and the model / teacher folders (no weights loaded). :meth:`facts` is recorded in the
    manifest, and ``crepa train`` rebuilds it to refuse a cache that no longer fits the run file."""

    def __init__(
        self,
        config: RunConfig,
        family: ModelFamily,
        transformer_config: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        model = config.model
        self.family = family
        self.patch_sizes = patch_sizes_from_config(family, transformer_config)
        self.dtype = str(dtype).removeprefix("torch.")
        tiling = "+tiled" if config.cache.vae_tiling else ""  # tiled encoding gives other latents
        # I2V families store their image conditioning with the latents: the image encoder joins the key.
        self.vae = source_fingerprint(model.pretrained, model.revision, IMAGE_INPUT_FOLDERS) + tiling
        self.text_encoders = source_fingerprint(
            model.pretrained, model.revision, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        )
        self.text_length = text_length(family, transformer_config)
        data = config.data
        where: dict[str, Any] = {
            "source": str(data.source),
            "resolutions": [list(size) for size in data.resolutions],
            "num_frames": list(data.num_frames),
        }
        if data.sources:  # repeats are not a fact of the cache: they only change the batch order
            where = {
                "sources": [
                    {
                        "path": str(source.path),
                        "caption_prefix": source.caption_prefix,
                        "resolutions": [list(size) for size in source.resolutions],
                        "num_frames": list(source.num_frames),
                    }
                    for source in data.dataset_sources()
                ]
            }
        self.sampling = {
            **where,
            "fps": data.fps,
            "stride": data.stride,
            "start": data.start,
            "video_column": data.video_column,
            "caption_column": data.caption_column,
        }
        self.teacher: dict[str, Any] | None = None
        if uses_cached_teacher(config):
            settings = config.teacher
            self.teacher = {
                "model": source_fingerprint(settings.name),
                "name": settings.name,
                "kind": settings.kind,
                "max_pixels": settings.max_pixels,
                "size_rule": TEACHER_SIZE_RULE,
                "reduce": settings.reduce,
                "compute": "bf16-autocast" if device.type == "cuda" else "fp32",
            }

    def facts(self) -> dict[str, Any]:
        """What the cache's parts depend on, as recorded in the manifest (``Manifest.identity``)."""
        return {
            "family": self.family.name,
            "dtype": self.dtype,
            "vae": self.vae,
            "text_encoders": self.text_encoders,
            "text_length": self.text_length,
            "sampling": self.sampling,
            "teacher": self.teacher,
        }

    def text(self, caption: str) -> str:
        return text_key(caption, self.family.name, self.text_encoders, self.text_length, self.dtype)

    def parts(self, clip: dict[str, Any], caption: str, grid: tuple[int, int, int]) -> dict[str, str]:
        """The part keys of one sample with pixels ``clip`` (:func:`clip_facts`) and ``caption``."""
        parts = {
            "latents": latents_key(clip, self.family.name, self.vae, self.dtype),
            "text": self.text(caption),
        }
        if self.teacher is not None:
            parts["teacher"] = teacher_key(clip, self.teacher, grid, self.family.temporal_ratio)
        return parts

    def plan(
        self, index: int, sample: VideoSample, hasher: FileHasher, shards: ShardIndex, source: int = 0
    ) -> _Plan:
        clip = clip_facts(hasher(sample.path), sample.frame_indices, sample.size)
        grid = student_grid(self.family, self.patch_sizes, sample.num_frames, *sample.size)
        parts = self.parts(clip, sample.caption, grid)
        missing = [kind for kind, key in parts.items() if not shards.has(key)]
        return _Plan(index, sample, grid, parts, missing, sample.caption, source)


class _Worker:
    """Computes one rank's missing parts: loads only the models they need, queues parts in shards.

    computed: parts computed per kind; seconds: time per stage (decode, vae, text, teacher).
    """

    def __init__(
        self,
        config: RunConfig,
        family: ModelFamily,
        plans: list[_Plan],
        dtype: torch.dtype,
        device: torch.device,
        shard_prefix: str,
    ) -> None:
        self.config, self.family, self.plans = config, family, plans
        self.todo = [plan for plan in plans if plan.missing]
        self.writer = ShardWriter(
            config.cache.dir / SHARDS_DIR, shard_prefix, int(config.cache.shard_mb * 2**20)
        )
        self.computed: Counter[str] = Counter()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._done: set[str] = set()
        needed = {kind for plan in self.todo for kind in plan.missing}
        model = config.model
        self.components = None
        if needed & {"latents", "text"}:
            with hub_access(model.pretrained, "model.pretrained"):
                self.components = load_components(
                    model.pretrained,
                    family.name,
                    model.revision,
                    dtype,
                    device,
                    vae="latents" in needed,
                    text_encoders="text" in needed,
                )
            if config.cache.vae_tiling and "latents" in needed:
                self.components.vae.enable_tiling()
        self.teacher = None
        if "teacher" in needed:
            settings = config.teacher
            with hub_access(settings.name, "teacher.name"):
                self.teacher = load_teacher(
                    settings.name, settings.kind, device=device, chunk_size=settings.chunk_size
                )

    def run(self, report: DataReport, bar: _ProgressBar) -> list[CacheEntry]:
        """Compute every plan's missing parts; returns the entries of the samples that are complete.

        Clips that fail to decode are recorded in ``report`` (by :func:`crepa.data.iter_decoded`).
        """
        entries = [_entry(plan) for plan in self.plans if not plan.missing]
        with_frames = {
            id(plan.sample): plan for plan in self.todo if {"latents", "teacher"} & set(plan.missing)
        }
        clock, count = time.perf_counter(), 0
        for sample, decoded in iter_decoded([plan.sample for plan in with_frames.values()], report):
            self.seconds["decode"] += time.perf_counter() - clock
            plan = with_frames[id(sample)]
            self._parts(plan, decoded.frames)
            entries.append(_entry(plan))
            bar.advance()
            clock, count = time.perf_counter(), count + 1
        bar.advance(len(with_frames) - count)  # clips that failed to decode
        for plan in self.todo:
            if id(plan.sample) not in with_frames:
                self._parts(plan, None)
                if plan.sample is not None:  # None: the empty prompt, no clip of the bar
                    entries.append(_entry(plan))
                    bar.advance()
        return entries

    def _parts(self, plan: _Plan, frames: torch.Tensor | None) -> None:
        """Compute and queue ``plan``'s missing parts; ``frames`` (T, 3, H, W) in [0, 1] when needed."""
        missing = [kind for kind in plan.missing if plan.parts[kind] not in self._done]
        where = str(plan.sample.path) if plan.sample is not None else "empty prompt"
        for kind in missing:
            clock = time.perf_counter()
            if kind == "latents":
                part = {"latents": self._latents(plan, frames)}
                if (
                    self.family.name in IMAGE_ENCODERS
                ):  # image-to-video: what the pipeline takes from the image
                    part |= IMAGE_ENCODERS[self.family.name](self.components, frames)
            elif kind == "text":
                part = _first(encode_prompts(self.components, [plan.caption]))
            else:
                settings = self.config.teacher
                grid = clip_teacher_grid(
                    self.teacher,
                    frames,
                    plan.grid,
                    self.family.temporal_ratio,
                    settings.reduce,
                    max_pixels=settings.max_pixels,
                    chunk_size=settings.chunk_size,
                )
                part = {"teacher": grid}
            self.writer.add(kind, plan.parts[kind], to_storage(part, f"{where}: {kind}"))
            self.seconds["vae" if kind == "latents" else kind] += time.perf_counter() - clock
            self._done.add(plan.parts[kind])
            self.computed[kind] += 1

    def _latents(self, plan: _Plan, frames: torch.Tensor) -> torch.Tensor:
        """(C, F, h, w) normalised latents of clean ``frames``; checks the VAE's compression."""
        latents = encode_latents(self.components.vae, frames.permute(1, 0, 2, 3).unsqueeze(0).mul(2).sub(1))[
            0
        ]
        patch = self.components.patch_sizes
        expected = (plan.grid[0], plan.grid[1] * patch[1], plan.grid[2] * patch[2])
        if tuple(latents.shape[1:]) != expected:
            family, (frames_count, height, width) = self.family, (len(frames), *frames.shape[-2:])
            raise RuntimeError(
                f"{self.config.model.pretrained}: the VAE turned {frames_count}x{height}x{width} frames into "
                f"latents {tuple(latents.shape[1:])}, expected {expected} from the {family.name} registry entry "
                f"(temporal {family.temporal_ratio}x, spatial {family.spatial_ratio}x); set model.family"
            )
        return latents


def _first(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The only item of a batch of one."""
    return {name: tensor[0] for name, tensor in batch.items()}


def _entry(plan: _Plan) -> CacheEntry:
    stat = plan.sample.path.stat()
    return CacheEntry(
        index=plan.index,
        key=digest(plan.parts),
        video=str(plan.sample.path.resolve()),
        caption=plan.sample.caption,
        frame_indices=tuple(plan.sample.frame_indices),
        size=tuple(plan.sample.size),
        grid=plan.grid,
        parts=plan.parts,
        file_size=stat.st_size,
        file_mtime_ns=stat.st_mtime_ns,
        source=plan.source,
    )


def _merge(
    config: RunConfig,
    family: ModelFamily,
    identity: CacheIdentity,
    world: int,
    null_text: str | None,
    report: DataReport,
    prune: bool,
    started: float,
) -> PrecomputeSummary:
    """Rank 0, after every rank has written its file: one manifest, damaged shards deleted, stale ones reported."""
    cache_dir = config.cache.dir
    shards_dir, ranks_dir = cache_dir / SHARDS_DIR, cache_dir / RANKS_DIR
    documents = _wait_for_ranks(ranks_dir, world)
    index = ShardIndex(shards_dir)
    damaged: dict[str, str] = {}
    for document in documents:
        damaged |= document["damaged"]
    for document in documents[1:]:  # rank 0's own skips are in ``report`` already
        for path, problem, detail in document["decode_skips"]:
            report.skip(path, problem, detail)
    for shard, reason in damaged.items():
        index.mark_damaged(shard, reason)
    entries = sorted(
        (CacheEntry.from_json(entry) for document in documents for entry in document["entries"]),
        key=lambda entry: entry.index,
    )
    keys = {key for entry in entries for key in entry.parts.values()} | ({null_text} if null_text else set())
    parts = {}
    for key in sorted(keys):
        location = index.locate(key)
        if location is None:
            raise RuntimeError(
                f"{shards_dir}: part {key} was computed but no shard holds it; run precompute again"
            )
        parts[key] = location
    teacher = None
    if identity.teacher is not None:
        dims = {parts[entry.parts["teacher"]].shapes["teacher"][-1] for entry in entries}
        teacher = {**identity.teacher, "dim": dims.pop() if len(dims) == 1 else None}
    manifest = Manifest(
        family=family.name,
        pretrained=config.model.pretrained,
        temporal_ratio=family.temporal_ratio,
        teacher=teacher,
        entries=entries,
        parts=parts,
        null_text=null_text,
        identity=identity.facts(),
    )
    manifest.write(cache_dir)
    for shard in damaged:
        (shards_dir / shard).unlink(missing_ok=True)
    used_shards = {location.shard for location in parts.values()}
    stale = sorted(set(index.shards) - used_shards - set(damaged))
    stale_bytes = sum((shards_dir / shard).stat().st_size for shard in stale)
    if prune:
        for shard in stale:
            (shards_dir / shard).unlink(missing_ok=True)
    hashes: dict[str, Any] = {}
    for document in documents:
        hashes |= document["hashes"]
    atomic_write_json(cache_dir / FILE_HASHES, hashes)
    shutil.rmtree(ranks_dir, ignore_errors=True)
    total = {kind: sum(document["computed"].get(kind, 0) for document in documents) for kind in PART_KINDS}
    reused = {kind: sum(document["reused"].get(kind, 0) for document in documents) for kind in PART_KINDS}
    stage_seconds = {
        stage: sum(document["stage_seconds"][stage] for document in documents) for stage in STAGES
    }
    return PrecomputeSummary(
        cache_dir=cache_dir,
        samples=len(entries),
        computed=total,
        reused=reused,
        damaged=damaged,
        part_bytes=manifest.part_bytes(),
        disk_bytes=sum((shards_dir / shard).stat().st_size for shard in used_shards),
        stale_shards=stale,
        stale_bytes=stale_bytes,
        pruned=prune,
        report=report,
        seconds=time.perf_counter() - started,
        stage_seconds=stage_seconds,
    )


def read_json(path: Path, default: Any) -> Any:
    """The JSON document at ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


def _wait_for_ranks(ranks_dir: Path, world: int, poll_seconds: float = 0.5) -> list[dict[str, Any]]:
    """The rank files of all ``world`` ranks (rank 0 first), waiting for the slower ranks."""
    paths = [ranks_dir / f"rank{rank}.json" for rank in range(world)]
    announced = False
    while not all(path.is_file() for path in paths):
        if not announced:
            logger.info("waiting for the other ranks to finish")
            announced = True
        time.sleep(poll_seconds)
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


class _ProgressBar:
    """A rich progress bar over clips (count, rate, elapsed, ETA); silent when disabled."""

    def __init__(self, enabled: bool, total: int, world: int) -> None:
        label = "precompute" if world == 1 else f"precompute (rank 0 of {world})"
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("clips"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task(label, total=total, rate="")

    def advance(self, count: int = 1) -> None:
        self.progress.update(self.task, advance=count)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:.2f} clips/s" if speed else "")

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
