"""The run file: one TOML document describes a crepa run (precompute, train, validation, output).

Validated with pydantic before any weight is loaded. Errors are collected into one
:class:`ConfigError` whose message names each bad key by its full path (``crepa.tau``), what was
expected and what was given, and suggests the closest valid key for a typo.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crepa.align.grids import valid_frame_counts_near
from crepa.align.settings import CrepaConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class _Section(BaseModel):
    # inf / nan are never a meaningful setting (optim.lr = inf would silently turn weights into NaN)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    """Which pretrained video model to fine-tune."""

    pretrained: str = Field(description="hub id or local directory of a diffusers pipeline")
    family: str | None = Field(
        default=None, description="registry name; detected from the transformer when omitted"
    )
    revision: str | None = None
    expert: Literal["transformer", "transformer_2"] | None = Field(
        default=None,
        description="two-expert pipelines (Wan 2.2 A14B): the expert this run trains, on its own noise range",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool | Annotated[int, Field(ge=0)] = Field(
        default=True,
        description="recompute block activations in backward: true (every block), false, or N (the first N)",
    )
    offload_blocks: int = Field(
        default=0, ge=0, description="blocks whose weights live in pinned CPU memory, streamed in one ahead"
    )
    offload_activations: bool = Field(
        default=False,
        description="checkpointed blocks keep their inputs in CPU memory until backward (CUDA only)",
    )
    base_precision: Literal["bf16", "fp8"] = Field(
        default="bf16", description="storage of the frozen weights; fp8 is cast to bf16 layer by layer"
    )
    compile: bool = Field(
        default=False, description="torch.compile each transformer block (hooks stay eager around it)"
    )

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The weights' dtype on ``device``: ``dtype``, with "auto" = bf16 on CUDA, fp32 elsewhere."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


class SourceSection(_Section):
    """One dataset of a ``[[data.sources]]`` list: its clips, how often an epoch repeats them, a
    prefix for its captions (a trigger word) and, optionally, its own buckets."""

    path: Path = Field(description="folder of videos + .txt captions, or a .csv / .jsonl file")
    repeats: int = Field(default=1, ge=1, description="times each of its samples appears per epoch")
    caption_prefix: str = Field(default="", description="prepended to every caption, e.g. 'sks dog, '")
    resolutions: list[tuple[int, int]] | None = Field(default=None, min_length=1)
    num_frames: list[int] | None = Field(default=None, min_length=1)


class DataSection(_Section):
    """The user's clips and how frames are sampled from them."""

    source: Path | None = Field(
        default=None, description="folder of videos + .txt captions, or a .csv / .jsonl file"
    )
    sources: list[SourceSection] = Field(
        default_factory=list, description="several datasets ([[data.sources]]) instead of data.source"
    )
    resolutions: list[tuple[int, int]] = Field(default_factory=lambda: [(480, 720)], min_length=1)
    num_frames: list[int] = Field(default_factory=lambda: [49], min_length=1)
    fps: float | None = Field(default=None, gt=0, description="resample clips to this frame rate")
    stride: int = Field(default=1, ge=1)
    start: float = Field(default=0.0, ge=0, description="seconds skipped at the start of each clip")
    video_column: str = "video"
    caption_column: str = "caption"
    caption_dropout: float = Field(
        default=0.0, ge=0, le=1, description="probability that a sample trains on the empty prompt"
    )

    @model_validator(mode="after")
    def _one_way_to_name_the_data(self) -> DataSection:
        if (self.source is None) == (not self.sources):
            raise ValueError(
                "give the clips as data.source (one dataset) or as [[data.sources]] tables (several), "
                f"{'not both' if self.sources else 'neither is set'}"
            )
        return self

    def dataset_sources(self) -> list[SourceSection]:
        """Every dataset with its buckets filled in: the ``[[data.sources]]``, or ``data.source`` as
        the one source (repeats 1, no caption prefix, data.resolutions / data.num_frames)."""
        if not self.sources:
            return [SourceSection(path=self.source, resolutions=self.resolutions, num_frames=self.num_frames)]
        return [
            source.model_copy(
                update={
                    "resolutions": source.resolutions or self.resolutions,
                    "num_frames": source.num_frames or self.num_frames,
                }
            )
            for source in self.sources
        ]


class CacheSection(_Section):
    """Where precomputed latents, text embeddings and teacher grids live."""

    dir: Path = Path("cache")
    teacher_source: Literal["cache", "pixels", "vae"] = "cache"
    shard_mb: float = Field(default=256.0, gt=0, description="size at which a shard file is written")
    vae_tiling: bool = Field(
        default=False, description="encode in spatial tiles (less memory, slightly different latents)"
    )


class TeacherSection(_Section):
    """The frozen image encoder whose patch features are the alignment targets."""

    name: str = "facebook/dinov2-giant"
    kind: Literal["auto", "dinov2", "timm", "clip", "siglip"] = "auto"
    reduce: Literal["mean", "first", "last", "center"] = "mean"
    max_pixels: int | None = Field(
        default=None, ge=14 * 14, description="cap on teacher input pixels; none: the student's full grid"
    )
    chunk_size: int = Field(default=16, ge=1)


class AlignmentSection(CrepaConfig):
    """CrepaConfig plus ``enabled``: false trains with the diffusion loss only (the baseline)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    enabled: bool = True
    lr: float | None = Field(default=None, gt=0, description="projector learning rate; optim.lr when omitted")


class LoraSection(_Section):
    enabled: bool = True  # false: full fine-tuning of the transformer
    variant: Literal["lora", "dora", "lokr", "loha"] = Field(
        default="lora",
        description="adapter kind (peft): lora, dora; lokr and loha are refused (diffusers cannot load them)",
    )
    rank: int = Field(default=64, ge=1)
    alpha: float = Field(default=64.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: str | list[str] | None = Field(default=None, description="peft target_modules; family default")

    @field_validator("variant")
    @classmethod
    def _exportable(cls, variant: str) -> str:
        if variant in ("lokr", "loha"):
            raise ValueError(
                f"{variant!r} cannot be exported in a form the video pipelines load: their load_lora_weights "
                "(diffusers 0.42) reads LoRA and DoRA keys only (LoKr loads into Flux 2 pipelines alone, LoHa "
                "into none); use 'lora' or 'dora'"
            )
        return variant


class OptimSection(_Section):
    name: Literal["adamw", "adamw8bit"] = Field(
        default="adamw", description="adamw8bit: 8-bit moments (bitsandbytes, CUDA only)"
    )
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)


class TrainSection(_Section):
    max_steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=1, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    timestep_sampling: Literal["auto", "uniform", "logit_normal", "mode", "shifted"] = Field(
        default="auto",
        description="noise-level sampler (SD3 paper); auto: logit_normal for flow matching, uniform "
        "integer timesteps for DDPM families; any other value applies to DDPM families too",
    )
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = Field(
        default=1.29, ge=-1.0, le=2 / (math.pi - 2), description="heavy-tail scale of 'mode' sampling"
    )
    shift: float = Field(
        default=1.0,
        gt=0,
        validate_default=True,
        description="timestep shift s' = shift*s / (1 + (shift-1)*s)",
    )
    loss_weighting: Literal["none", "min_snr", "sigma_sqrt", "cosmap"] = Field(
        default="none",
        description="per-sample weight of the diffusion loss; sigma_sqrt and cosmap need a flow-matching family",
    )
    snr_gamma: float = Field(default=5.0, gt=0, description="gamma of min_snr weighting (Hang et al. 2023)")
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    max_nonfinite_steps: int = Field(default=10, ge=1)
    num_workers: int | None = Field(
        default=None, ge=0, description="loader processes per training process; default: spare cores, <= 4"
    )

    @field_validator("shift")
    @classmethod
    def _shift_for_shifted(cls, shift: float, info: ValidationInfo) -> float:
        if info.data.get("timestep_sampling") == "shifted" and shift == 1.0:
            raise ValueError(
                "train.timestep_sampling = 'shifted' draws uniform levels moved by train.shift, which is 1 "
                "(no shift); set train.shift (e.g. 3.0, the SD3 paper's value) or use 'uniform'"
            )
        return shift


class LoggingSection(_Section):
    every: int = Field(default=10, ge=1)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "crepa"


class ValidationSection(_Section):
    every: int = Field(default=0, ge=0, description="steps between validations; 0 turns validation off")
    prompts: list[str] = Field(default_factory=list)
    # Unset: the run's first training bucket (data.num_frames[0], data.resolutions[0]), filled in by RunConfig.
    num_frames: int | None = Field(default=None, ge=1, description="default: data.num_frames[0]")
    height: int | None = Field(default=None, ge=8, description="default: data.resolutions[0][0]")
    width: int | None = Field(default=None, ge=8, description="default: data.resolutions[0][1]")
    inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=6.0, ge=0)
    fps: float = Field(default=8.0, gt=0)
    seed: int = 0
    images: list[Path] = Field(
        default_factory=list, description="image-to-video models: the first frame of each prompt, in order"
    )

    @model_validator(mode="after")
    def _one_image_per_prompt(self) -> ValidationSection:
        if self.images and len(self.images) != len(self.prompts):
            raise ValueError(
                f"images: {len(self.images)} image(s) for {len(self.prompts)} prompt(s); give one per prompt"
            )
        return self


class OutputSection(_Section):
    dir: Path = Path("runs/crepa")


class RepVideoSection(_Section):
    enabled: bool = False
    window: int = Field(default=6, ge=1)
    gate_init: float = 0.0
    include_text: bool = False
    lr: float | None = Field(default=None, gt=0)


class ExperimentSection(_Section):
    """``crepa experiment``'s analysis plan (never read by training): the primary metrics of the verdict's
    headline (None: subject consistency, flicker, warping error, Frechet distance) and equivalence margins
    by metric; ``--primary`` / ``--margin`` override them."""

    primary: list[str] | None = None
    margins: dict[str, float] = Field(default_factory=dict)


class EmaSection(_Section):
    """An exponential moving average of the trained weights (LoRA or transformer, projector, gates)."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)
    update_every: int = Field(default=1, ge=1, description="optimiser steps between EMA updates")
    start_step: int = Field(default=0, ge=0, description="until this step the EMA copies the weights")
    device: Literal["gpu", "cpu"] = Field(default="gpu", description="cpu: the EMA in host memory")
    # run-file key "validate" (a field of that name would shadow pydantic's BaseModel.validate)
    validate_with_ema: bool = Field(
        default=False, alias="validate", description="sample validation with the EMA weights"
    )


class RunConfig(_Section):
    """A whole run file. Relative paths are resolved against the file's directory."""

    model: ModelSection
    data: DataSection
    cache: CacheSection = Field(default_factory=CacheSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    crepa: AlignmentSection = Field(default_factory=AlignmentSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    repvideo: RepVideoSection = Field(default_factory=RepVideoSection)
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    ema: EmaSection = Field(default_factory=EmaSection)

    @model_validator(mode="after")
    def _validation_shape_from_first_bucket(self) -> RunConfig:
        """Validation clips unset in size take the shape of the first training bucket: one the model
        was just trained on (never another model's defaults)."""
        validation, data = self.validation, self.data
        if validation.num_frames is None:
            validation.num_frames = data.num_frames[0]
        if validation.height is None:
            validation.height = data.resolutions[0][0]
        if validation.width is None:
            validation.width = data.resolutions[0][1]
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.crepa.enabled and self.crepa.mode == "backbone" and self.cache.teacher_source != "cache":
            raise ValueError(
                "cache.teacher_source: backbone mode needs no external teacher; leave it 'cache'"
            )
        if self.model.base_precision == "fp8" and not self.lora.enabled:
            raise ValueError(
                "model.base_precision: 'fp8' stores the frozen weights in fp8, and with lora.enabled = false "
                "every weight trains; set lora.enabled = true or model.base_precision = 'bf16'"
            )
        return self


class ConfigError(ValueError):
    """A run file that cannot be used; the message is meant for the user as is."""


def check_against_family(
    config: RunConfig,
    temporal_ratio: int,
    spatial_multiples: tuple[int, int],
    causal_vae: bool = True,
    depth: int | None = None,
    temporal_patch: int = 1,
) -> None:
    """Shape checks that need the model family but no weights: frame counts 1 + r*m (r*m for
    non-causal VAEs) giving latent frames in whole ``temporal_patch``es, resolutions divisible by
    VAE stride x patch size (per axis: (height, width)), block indices inside ``depth``. Shared by
    precompute and train."""
    problems = []
    several = bool(config.data.sources)
    for i, source in enumerate(config.data.dataset_sources()):
        where = f"data.sources[{i}]" if several else "data"
        problems += _bucket_problems(
            where,
            source.num_frames,
            source.resolutions,
            temporal_ratio,
            spatial_multiples,
            causal_vae,
            temporal_patch,
        )
    if depth is not None and config.crepa.enabled:
        for key in ("block_index", "teacher_block_index"):
            index = getattr(config.crepa, key)
            if index is not None and index >= depth:
                problems.append(
                    f"crepa.{key}: {index} is beyond the model's {depth} blocks (valid: 0..{depth - 1})"
                )
    if problems:
        raise ConfigError("invalid run file\n  " + "\n  ".join(problems))


def _bucket_problems(
    where: str,
    num_frames: list[int],
    resolutions: list[tuple[int, int]],
    temporal_ratio: int,
    spatial_multiples: tuple[int, int],
    causal_vae: bool,
    temporal_patch: int,
) -> list[str]:
    """Frame counts and resolutions of one source (keys ``{where}.num_frames`` / ``.resolutions``)
    that the family cannot encode."""
    problems = []
    for count in num_frames:
        latent_frames = 1 + (count - 1) // temporal_ratio
        if causal_vae and not (count - 1) % temporal_ratio and latent_frames % temporal_patch:
            near = " or ".join(
                map(str, valid_frame_counts_near(count, temporal_ratio, latent_multiple=temporal_patch))
            )
            problems.append(
                f"{where}.num_frames: {count} frames give {latent_frames} latent frames, but this model patches "
                f"{temporal_patch} latent frames per token; use {near}"
            )
        elif causal_vae and (count - 1) % temporal_ratio:
            near = " or ".join(map(str, valid_frame_counts_near(count, temporal_ratio)))
            problems.append(
                f"{where}.num_frames: {count} frames cannot be encoded, this model needs 1 + {temporal_ratio}*m "
                f"(e.g. {near})"
            )
        elif not causal_vae and count % temporal_ratio:
            near = max(1, round(count / temporal_ratio)) * temporal_ratio
            problems.append(
                f"{where}.num_frames: {count} frames cannot be encoded, this model needs a multiple of "
                f"{temporal_ratio} (e.g. {near})"
            )
    if 1 in num_frames and any(problem.startswith(f"{where}.num_frames: 1 ") for problem in problems):
        problems.append(
            f"{where}.num_frames: 1 is the frame count of images (one-frame clips), which this model "
            "family cannot train on; drop 1 and the images from this source"
        )
    multiple_h, multiple_w = spatial_multiples
    for height, width in resolutions:
        if height % multiple_h or width % multiple_w:
            near_h = max(1, round(height / multiple_h)) * multiple_h
            near_w = max(1, round(width / multiple_w)) * multiple_w
            problems.append(
                f"{where}.resolutions: {height}x{width} must be divisible by {multiple_h}x{multiple_w} "
                f"(VAE stride x patch size); nearest: {near_h}x{near_w}"
            )
    return problems


def check_optional_dependencies(config: RunConfig) -> None:
    """Settings that need a package crepa does not install by default: fail now, not after hours."""
    needed = []
    if config.logging.wandb:
        needed.append(("logging.wandb", "wandb", "pip install wandb", "set logging.wandb = false"))
    if config.teacher.kind == "timm" or config.teacher.name.startswith(("timm/", "timm:")):
        needed.append(("teacher.kind", "timm", "pip install 'crepa[timm]'", "use a transformers teacher"))
    problems = [
        f"{key}: needs the {package!r} package, which is not installed; {install}, or {alternative}"
        for key, package, install, alternative in needed
        if importlib.util.find_spec(package) is None
    ]
    if problems:
        raise ConfigError("invalid run file\n  " + "\n  ".join(problems))


def _valid_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at ``path`` (the parent of an unknown key)."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        current = fields[part].annotation
    return [field.alias or name for name, field in getattr(current, "model_fields", {}).items()]


def _format_error(error: dict[str, Any]) -> str:
    location = tuple(error["loc"])
    dotted = ".".join(str(part) for part in location) or "(top level)"
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(RunConfig, location[:-1])
        close = difflib.get_close_matches(str(location[-1]), valid, n=1)
        hint = f"did you mean '{'.'.join([*map(str, location[:-1]), close[0]])}'?" if close else ""
        return f"{dotted}: unknown key. {hint} Valid keys here: {', '.join(valid)}".replace(".  ", ". ")
    if error["type"] == "missing":
        return f"{dotted}: required key is missing"
    given = error.get("input")
    message = error["msg"]
    message = message[0].lower() + message[1:] if message else message
    if error["type"] in ("value_error", "assertion_error"):
        return f"{dotted}: {message.removeprefix('value error, ')}"
    return f"{dotted}: expected {message.removeprefix('input should be ')}, got {given!r}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=2000"`` -> (["train", "max_steps"], 2000); values are parsed as TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=2000")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as cosine is taken as a string
    return key.strip().split("."), value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override (``--set a.b=value``) and validate a run file; raise :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    for override in overrides:
        keys, value = parse_override(override)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override}: {key} is not a section")
        node[keys[-1]] = value
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        lines = [_format_error(e) for e in error.errors()]
        raise ConfigError(f"{path}: invalid run file\n  " + "\n  ".join(lines)) from None
    base = path.parent
    # Hub ids stay as they are; a name that is a directory next to the run file becomes its path.
    for section, key in ((config.model, "pretrained"), (config.teacher, "name")):
        local = base / getattr(section, key)
        if local.exists():
            setattr(section, key, str(local.resolve()))
    if config.data.source is not None:
        config.data.source = (base / config.data.source).resolve()
    for source in config.data.sources:
        source.path = (base / source.path).resolve()
    config.validation.images = [(base / image).resolve() for image in config.validation.images]
    config.cache.dir = (base / config.cache.dir).resolve()
    config.output.dir = (base / config.output.dir).resolve()
    return config
