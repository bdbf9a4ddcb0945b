"""One LoRA training step of a published video transformer at its published shape, per alignment mode,
side by side in one run: step time, peak memory above the weights, tokens/s and model FLOPs utilisation.

The transformer is the family's published config (``crepa.plan.published``) with random weights, built
on the device; the step is the trainer's own: ``add_lora`` + fp32 trainables over bf16 weights,
``CrepaRegularizer``, ``install_repvideo``, ``StepParts`` / ``step_loss`` under bf16 autocast, AdamW.
Rows:
  none      diffusion loss only
  cache     CREPA, teacher grids as read from the precomputed cache
  repa      REPA* (frame-wise), grids from the cache
  pixels    CREPA, a DINOv2-g-sized teacher (random weights) encodes every frame inside the step
  vae       CREPA, the family's VAE decodes the clean latents, then the teacher, inside the step
  repvideo  CREPA from the cache with RepVideo's gated cross-layer aggregation
A row "MODE@N" checkpoints only the first N blocks (``model.gradient_checkpointing = N``); the memory
options (``--base-precision``, ``--offload-blocks``, ``--offload-activations``, ``--optimizer``) apply to
every row.

``--plan`` adds crepa plan's predicted peak per process beside the measured one
(``torch.cuda.max_memory_allocated``, weights and optimiser state included) for the rows it models
(none, cache, repa, repvideo). ``--fit 24GiB`` trains with the setting ``crepa plan`` picks for that
budget (the fastest that fits, among those that keep any memory option given explicitly) and exits 1
when a measured peak exceeds the budget or misses the prediction by more than 15 %.

With an online teacher row it also times the teacher alone (the step's own call: ms, TFLOP, MFU), and
``--profile ROW`` prints the top operators of one step of that row (torch.profiler).

Model FLOPs (for MFU): a step counted by torch's FlopCounterMode, minus the forward that gradient
checkpointing recomputes (counted once more in a no-grad forward), against the chip's dense bf16 peak.

    python benchmarks/bench_real_step.py --family CogVideoX-5B [--steps 2] [--rounds 2] [--rows none,cache]
    python benchmarks/bench_real_step.py --rows none,none@13     # every block vs the first 13 checkpointed
    python benchmarks/bench_real_step.py --rows cache,pixels --profile pixels   # where the teacher's time goes
    python benchmarks/bench_real_step.py --family Wan2.1-T2V-14B --base-precision fp8 --offload-blocks 30 \
        --offload-activations --rows none                          # the memory options of crepa plan
    python benchmarks/bench_real_step.py --family Wan2.1-T2V-14B --fit 24GiB --base-precision fp8 --rows cache
    python benchmarks/bench_real_step.py --small        # the same code on a tiny config, CPU, < 1 min
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode

from crepa.config import RunConfig
from crepa.models.conditioning import text_width
from crepa.models.loading import load_online_teacher
from crepa.models.memory import apply_memory_options, checkpointed_count, set_gradient_checkpointing
from crepa.models.pipelines import text_length
from crepa.models.registry import detect_family
from crepa.plan.memory import (
    GIB,
    ModelProfile,
    Settings,
    Workload,
    estimate,
    profile_model,
)
from crepa.plan.planner import latent_shape, parse_memory, plan_workload, workload_of
from crepa.plan.published import PUBLISHED
from crepa.regularizer import CrepaRegularizer
from crepa.repvideo import install_repvideo
from crepa.train.lora import add_lora
from crepa.train.setup import build_optimizer
from crepa.train.step import StepParts, batch_teacher_grid, step_loss, transformer_prediction

ROWS = ("none", "cache", "repa", "pixels", "vae", "repvideo")
PLAN_TOLERANCE = 0.15  # issue 21: a predicted peak within 15 % of the measured one
PLANNED_MODES = ("none", "cache", "repa", "repvideo")  # rows whose memory crepa plan models here
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, vendor datasheets
# DINOv2-g/14 (1.1 B): the paper's teacher
GIANT = dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True, image_size=518
)
SMALL_TEACHER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56
)
SMALL_VAE = {
    "cogvideox": dict(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=2,
    ),
    "wan": dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    "hunyuanvideo": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2),
}
VAE_CLASS = {
    "cogvideox": "AutoencoderKLCogVideoX",
    "wan": "AutoencoderKLWan",
    "hunyuanvideo": "AutoencoderKLHunyuanVideo",
}


@dataclass
class Measured:
    row: str
    step_ms: float
    peak_gib: float | None
    total_gib: float | None  # the whole peak: weights, batch and optimiser state included
    tokens_per_s: float
    model_tflop: float


# --small: the architecture kept, every width cut (keys present in the published config only);
# cross-attention and text widths follow the 2 x 16 attention width so the blocks still connect
SMALL_CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "ffn_dim": 64,
    "num_single_layers": 1, "num_refiner_layers": 1, "text_dim": 32, "text_embed_dim": 32,
    "time_embed_dim": 32, "caption_channels": 32, "cross_attention_dim": 32, "rope_axes_dim": (4, 6, 6),
}  # fmt: skip
FORCED_SMALL = ("num_attention_heads", "attention_head_dim", "num_layers")


def published(name: str, small: bool) -> tuple[str, dict, tuple[int, int, int]]:
    """(class name, config, (frames, height, width)); ``small`` keeps the architecture, shrinks it
    (its frame count is the family's: :func:`small_shape`)."""
    key = next((k for k in PUBLISHED if k.lower() == name.lower()), None)
    if key is None:
        raise SystemExit(f"--family {name}: unknown; choose one of {', '.join(PUBLISHED)}")
    model = PUBLISHED[key]
    if not small:
        return model.class_name, dict(model.config), model.shape
    tiny = {
        **model.config,
        **{k: v for k, v in SMALL_CONFIG.items() if k in model.config or k == "num_layers"},
    }
    return model.class_name, tiny, model.shape


def small_shape(family) -> tuple[int, int, int]:
    """Three latent frames of 64 x 96 pixels for the family's VAE (1 + 2r frames)."""
    return 1 + 2 * family.temporal_ratio, 64, 96


def run_config(
    family: str, shape: tuple[int, int, int], row: str, rank: int, small: bool, optimizer: str = "adamw"
) -> RunConfig:
    frames, height, width = shape
    source = {"pixels": "pixels", "vae": "vae"}.get(row, "cache")
    return RunConfig.model_validate(
        {
            "model": {"pretrained": "published", "family": family, "gradient_checkpointing": True},
            "data": {"source": ".", "resolutions": [[height, width]], "num_frames": [frames]},
            "cache": {"teacher_source": source},
            "crepa": {
                "enabled": row != "none",
                "mode": "repa" if row == "repa" else "crepa",
                "block_index": 0 if small else 8,
                "projector_hidden_dim": 64 if small else 2048,
            },
            "lora": {"rank": rank, "alpha": rank},
            "repvideo": {"enabled": row == "repvideo"},
            "optim": {"name": optimizer, "lr": 1e-5},
        }
    )


def ddpm_alphas(device: torch.device) -> torch.Tensor:
    """CogVideoX's scheduler (scaled-linear betas 0.00085-0.012, zero terminal SNR, SNR shift 3)."""
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        prediction_type="v_prediction",
    )
    return scheduler.alphas_cumprod.clone().to(device)


def make_batch(
    model, family, config: dict, shape, teacher_dim: int, device, dtype
) -> dict[str, torch.Tensor]:
    """A batch of one clip as the cache loader gives it (latents, text states, teacher grid, frames), of
    crepa plan's latent shape and text length."""
    frames, height, width = shape
    _, _, latent_frames, h, w = latents = latent_shape(family, config, frames, height, width)
    _, patch_h, patch_w = family.patch_sizes(model)
    tokens = text_length(family, config)
    batch = {
        "latents": torch.randn(*latents, device=device, dtype=dtype),
        "prompt_embeds": torch.randn(1, tokens, text_width(config), device=device, dtype=dtype),
        "prompt_attention_mask": torch.ones(1, tokens, dtype=torch.bool, device=device),
        "teacher": torch.randn(
            1, latent_frames, h // patch_h, w // patch_w, teacher_dim, device=device
        ).half(),
        "frames": torch.rand(1, frames, 3, height, width, device=device),
    }
    if "pooled_projection_dim" in config:
        batch["pooled_prompt_embeds"] = torch.randn(
            1, config["pooled_projection_dim"], device=device, dtype=dtype
        )
    return batch


def peak_tflops_of(device: torch.device) -> float | None:
    """The chip's dense bf16 peak (TFLOP/s) when it is a GPU this script knows."""
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="CogVideoX-5B", help=f"one of {', '.join(PUBLISHED)}")
    parser.add_argument("--small", action="store_true", help="tiny config and shape on the CPU (CI)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=1, help="steps before each row's timed steps")
    parser.add_argument("--rounds", type=int, default=2, help="rows interleaved this many times")
    parser.add_argument("--rank", type=int, default=64)
    # memory options: None = not given (bf16, 0, adamw, off; or crepa plan's choice with --fit)
    parser.add_argument("--base-precision", choices=("bf16", "fp8"), help="model.base_precision")
    parser.add_argument("--offload-blocks", type=int, help="model.offload_blocks")
    parser.add_argument(
        "--offload-activations", action="store_true", default=None, help="model.offload_activations"
    )
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), help="optim.name")
    parser.add_argument("--plan", action="store_true", help="crepa plan's predicted peak per row")
    parser.add_argument(
        "--fit", metavar="BUDGET", help="train with crepa plan's pick for this budget (e.g. 24GiB)"
    )
    parser.add_argument(
        "--profile", default="", help="a row whose step is profiled once: top kernels by time"
    )
    args = parser.parse_args()
    rows = args.rows.split(",")
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else nullcontext
    class_name, model_config, shape = published(args.family, args.small)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # random weights straight in bf16: no fp32 copy of a 14B model
        try:
            model = getattr(diffusers, class_name)(**model_config)
        finally:
            torch.set_default_dtype(previous)
    family = detect_family(model)
    if family.pipeline_class.endswith("ImageToVideoPipeline") or family.patch_sizes(model)[0] > 1:
        raise SystemExit(
            f"--family {args.family}: not benchmarked here; the bench builds text-to-video batches whose "
            "latent frames need no padding (no image conditioning, no temporal patch)"
        )
    if args.small:
        shape = small_shape(family)
    depth = len(family.blocks(model))
    workload = bench_workload(class_name, model_config, family, shape, rows[0], args)
    profiles: dict[str, ModelProfile] = {}  # crepa plan's trace of each row's workload
    settings = chosen_settings(args, depth, workload, profiles)
    args.optimizer = settings.optimizer
    model.enable_gradient_checkpointing()
    base = run_config(family.name, shape, "none", args.rank, args.small, args.optimizer)
    add_lora(model, family, base.lora)
    for parameter in model.parameters():  # fp32 trainables over bf16 weights, as the trainer does
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    apply_memory_options(
        model, family, settings.checkpointed_blocks, settings.base_precision, settings.offload_blocks,
        settings.offload_activations, device, dtype,
    )  # fmt: skip
    host = torch.device("cpu") if settings.offload_activations and device.type == "cuda" else None
    model.train()
    synchronize(device)
    weights_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    print(f"{args.family}{' (small)' if args.small else ''} on {device}: {class_name}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, shape {shape}, "
          f"built in {time.perf_counter() - started:.0f} s")  # fmt: skip

    with tempfile.TemporaryDirectory() as scratch:
        teacher, vae = None, None
        if {"pixels", "vae"} & set(rows):
            from transformers import Dinov2Config, Dinov2Model

            with torch.device(device):  # random init on the device: seconds for 1.1 B parameters
                tower = Dinov2Model(Dinov2Config(**(SMALL_TEACHER if args.small else GIANT))).to(dtype)
            tower.save_pretrained(Path(scratch) / "t")  # through the trainer's own loader
            del tower
            online = run_config(family.name, shape, "pixels", args.rank, args.small)
            online.teacher.name = str(Path(scratch) / "t")
            teacher, _ = load_online_teacher(online, family, device)
        if "vae" in rows:
            vae_class = getattr(diffusers, VAE_CLASS.get(family.name, "AutoencoderKLCogVideoX"))
            vae = vae_class(**(SMALL_VAE.get(family.name, {}) if args.small else {}))  # default: published
            vae = vae.to(device, dtype).eval().requires_grad_(False)
        teacher_dim = teacher.dim if teacher is not None else teacher_width(args.small)
        batch = make_batch(model, family, model_config, shape, teacher_dim, device, dtype)
        vae_channels = (
            vae.config.get("latent_channels") or vae.config.get("z_dim") if vae is not None else None
        )
        if vae is not None and vae_channels != batch["latents"].shape[1]:  # no VAE of this family here
            rows = [row for row in rows if row != "vae"]
        if device.type == "cuda":
            weights_bytes = torch.cuda.memory_allocated() - sum(
                t.numel() * t.element_size() for t in batch.values()
            )
        alphas = ddpm_alphas(device) if family.objective in ("v_prediction", "epsilon") else None
        video_tokens = batch["teacher"].shape[1:4].numel()
        parts = StepParts(
            config=base, family=family, transformer=model, model=model, regularizer=None, teacher=None,
            vae=None, dtype=dtype, alphas_cumprod=alphas, autocast=autocast,
        )  # fmt: skip
        with torch.no_grad(), FlopCounterMode(display=False) as counted_forward:
            transformer_prediction(parts, batch, torch.Generator(device).manual_seed(0))
        recompute_flop = counted_forward.get_total_flops()  # the forward that checkpointing repeats
        print(f"forward (recomputed in backward): {recompute_flop / 1e12:.4g} TFLOP")
        if teacher is not None:
            time_teacher_alone(model, family, shape, args, device, teacher, batch)
        resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # weights + batch
        times: dict[str, list[float]] = {row: [] for row in rows}
        peaks: dict[str, float | None] = dict.fromkeys(rows)
        totals: dict[str, float | None] = dict.fromkeys(rows)
        flop: dict[str, float] = {}
        for round_index in range(args.rounds):  # rows interleaved round by round: drift hits all alike
            for row in rows:
                mode, _, checkpointing = row.partition("@")  # "none@13": 13 blocks checkpointed
                blocks = parse_checkpointing(checkpointing, settings.checkpointed_blocks)
                set_gradient_checkpointing(model, family, blocks, host)
                row_times, peak, step_flop = measure(
                    mode, model, family, shape, args, device, dtype, autocast, teacher, vae, batch, alphas,
                    count_flops=round_index == 0 and mode not in flop,
                    profile=round_index == 0 and row == args.profile,
                )  # fmt: skip
                times[row] += row_times
                if peak is not None:
                    peaks[row] = max(peaks[row] or 0.0, (peak - resident) / 2**30)
                    totals[row] = max(totals[row] or 0.0, peak / 2**30)
                flop.setdefault(mode, step_flop - recompute_flop)
        results = []
        for row in rows:
            median = statistics.median(times[row])
            model_flop = flop[row.partition("@")[0]] / 1e12
            results.append(
                Measured(row, median, peaks[row], totals[row], video_tokens / (median / 1e3), model_flop)
            )
    peak_tflops = peak_tflops_of(device)
    print(
        f"weights resident: {weights_bytes / 2**30:.2f} GiB (peaks below: above weights and batch); {video_tokens} video tokens per clip"
    )
    predicted = {}
    if args.plan or args.fit:
        for row in rows:
            mode, _, checkpointing = row.partition("@")
            if mode in PLANNED_MODES:
                blocks = checkpointed_count(
                    parse_checkpointing(checkpointing, settings.checkpointed_blocks), depth
                )
                row_settings = replace(settings, checkpointed_blocks=blocks)
                row_workload = bench_workload(class_name, model_config, family, shape, mode, args)
                predicted[row] = predicted_peak(row_workload, row_settings, profiles) / GIB
    print(
        f"{'row':<9} {'ms/step':>9} {'vs none':>8} {'peak GiB':>9} {'vs none':>8} {'tokens/s':>9} {'TFLOP':>7} {'MFU':>6}"
        + (f" {'total GiB':>9} {'plan GiB':>9} {'vs total':>8}" if predicted else "")
    )
    none = next((r for r in results if r.row == "none"), None)
    for r in results:
        rel_t = f"{100 * (r.step_ms / none.step_ms - 1):+.2f}%" if none else ""
        rel_m = (
            f"{100 * (r.peak_gib / none.peak_gib - 1):+.2f}%" if none and r.peak_gib and none.peak_gib else ""
        )
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        tflop = f"{r.model_tflop:.3g}" if r.model_tflop is not None else "-"
        mfu = (
            f"{100 * r.model_tflop * 1e12 / (r.step_ms / 1e3) / (peak_tflops * 1e12):.1f}%"
            if peak_tflops and r.model_tflop
            else "-"
        )
        plan_columns = ""
        if predicted:
            total = f"{r.total_gib:.2f}" if r.total_gib is not None else "-"
            plan = f"{predicted[r.row]:.2f}" if r.row in predicted else "-"
            error = (
                f"{100 * (predicted[r.row] / r.total_gib - 1):+.1f}%"
                if r.row in predicted and r.total_gib
                else ""
            )
            plan_columns = f" {total:>9} {plan:>9} {error:>8}"
        print(
            f"{r.row:<9} {r.step_ms:>9.1f} {rel_t:>8} {peak:>9} {rel_m:>8} {video_tokens / (r.step_ms / 1e3):>9.0f} {tflop:>7} {mfu:>6}"
            + plan_columns
        )
    if args.fit and not fit_holds(args.fit, results, predicted):
        raise SystemExit(1)


def parse_checkpointing(text: str, default: int) -> bool | int:
    """The part after "@" of a row: "" (``default`` blocks), "true" (every block), "false" or a count."""
    if text == "":
        return default
    if text == "true":
        return True
    return False if text == "false" else int(text)


def teacher_width(small: bool) -> int:
    """The cached teacher grids' width: DINOv2-g's 1536 (the bench's tiny teacher's 32 with --small)."""
    return SMALL_TEACHER["hidden_size"] if small else GIANT["hidden_size"]


def bench_workload(class_name: str, model_config: dict, family, shape, mode: str, args) -> Workload:
    """What crepa plan models for a row of ``mode`` (cached grids; no online teacher) on the bench's
    transformer config, with the bench teacher's width."""
    config = run_config(family.name, shape, mode, args.rank, args.small)
    workload = workload_of(config, source=(class_name, model_config))
    return replace(workload, teacher_dim=teacher_width(args.small))


def profile_of(workload: Workload, profiles: dict[str, ModelProfile]) -> ModelProfile:
    """crepa plan's trace of ``workload``, once per workload (keyed by its repr: configs are dicts)."""
    key = repr(workload)
    if key not in profiles:
        profiles[key] = profile_model(workload)
    return profiles[key]


def predicted_peak(workload: Workload, settings: Settings, profiles: dict[str, ModelProfile]) -> int:
    """crepa plan's peak bytes per process on a GPU for ``workload`` under ``settings``."""
    return estimate(profile_of(workload, profiles), settings, workload).gpu_peak


def chosen_settings(args, depth: int, workload: Workload, profiles: dict[str, ModelProfile]) -> Settings:
    """The memory options of the run: those given, the rest at their defaults or, with ``--fit``, crepa
    plan's fastest setting for the budget among those that keep the options given."""
    given = {
        "offload_blocks": args.offload_blocks,
        "base_precision": args.base_precision,
        "optimizer": args.optimizer,
        "offload_activations": args.offload_activations,
    }
    given = {key: value for key, value in given.items() if value is not None}
    if not args.fit:
        return Settings(depth, **given)
    budget = parse_memory(args.fit)
    profile = profile_of(workload, profiles)
    plan = plan_workload(workload, profile, Settings(depth, **given), budget)
    keeping = [e for e in plan.fitting() if all(getattr(e.settings, k) == v for k, v in given.items())]
    if not keeping:
        raise SystemExit(
            f"--fit {args.fit}: crepa plan finds no setting that fits (with {given or 'nothing'} fixed)"
        )
    pick = keeping[0]
    print(f"crepa plan's pick for {args.fit}: {' '.join(pick.settings.set_lines(depth))} "
          f"(predicted {pick.gpu_peak / GIB:.2f} GiB)")  # fmt: skip
    return pick.settings


def fit_holds(budget_text: str, results: list[Measured], predicted: dict[str, float]) -> bool:
    """--fit's verdict: every measured peak within the budget and within PLAN_TOLERANCE of the prediction
    (rows measured on a GPU only)."""
    budget, holds = parse_memory(budget_text) / GIB, True
    for r in results:
        if r.total_gib is None or r.row not in predicted:
            continue
        error = predicted[r.row] / r.total_gib - 1
        fits = r.total_gib <= budget
        close = abs(error) <= PLAN_TOLERANCE
        print(f"{r.row}: measured {r.total_gib:.2f} GiB {'<=' if fits else '>'} {budget:.1f} GiB; "
              f"plan {predicted[r.row]:.2f} GiB ({100 * error:+.1f}%, {'within' if close else 'beyond'} "
              f"{100 * PLAN_TOLERANCE:.0f}%)")  # fmt: skip
        holds = holds and fits and close
    return holds


def measure(
    row,
    model,
    family,
    shape,
    args,
    device,
    dtype,
    autocast,
    teacher,
    vae,
    batch,
    alphas,
    count_flops: bool,
    profile: bool = False,
) -> tuple[list[float], int | None, float]:
    """ms of ``args.steps`` steps of ``row`` after ``args.warmup``, the peak bytes allocated during them
    (None off CUDA), and one step's FLOPs when ``count_flops`` (recompute included: the caller
    subtracts it); ``profile`` prints the top operators of one more step."""
    config = run_config(family.name, shape, row, args.rank, args.small, args.optimizer)
    regularizer, gates = None, None
    if config.crepa.enabled:
        regularizer = CrepaRegularizer(model, config.crepa, teacher_dim=batch["teacher"].shape[-1]).to(device)
    if config.repvideo.enabled:
        gates = install_repvideo(model, config.repvideo.window, config.repvideo.gate_init).to(device)
    parts = StepParts(
        config=config, family=family, transformer=model, model=model, regularizer=regularizer,
        teacher=teacher if row in ("pixels", "vae") else None, vae=vae if row == "vae" else None,
        dtype=dtype, alphas_cumprod=alphas, autocast=autocast,
    )  # fmt: skip
    trainables = [p for p in model.parameters() if p.requires_grad]
    for module in (regularizer, gates):
        if module is not None:
            trainables += [p for p in module.parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(config, [{"params": trainables}])
    generator = torch.Generator(device).manual_seed(0)

    def step(index: int) -> None:
        loss, _ = step_loss(parts, batch, index, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(args.warmup):
        step(index)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(args.steps):
        synchronize(device)
        started = time.perf_counter()
        step(args.warmup + index)
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if profile:
        print_profile(row, lambda: step(0), device)
    counted_step = FlopCounterMode(display=False)
    if count_flops:  # with every block checkpointed: minus one forward, the step's model FLOPs
        model.enable_gradient_checkpointing()
        with counted_step:
            step(0)
    for module in (regularizer, gates):
        if module is not None:
            module.remove()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, peak, float(counted_step.get_total_flops())


def time_teacher_alone(model, family, shape, args, device, teacher, batch) -> None:
    """The online teacher's share, measured apart: ms, TFLOP and MFU of the "pixels" grids of the batch
    (:func:`~crepa.train.step.batch_teacher_grid`, the step's own call), median of 3 after a warm-up."""
    config = run_config(family.name, shape, "pixels", args.rank, args.small)

    def grids() -> torch.Tensor:
        return batch_teacher_grid(config, family, model, batch, teacher, None)

    grids()
    with FlopCounterMode(display=False) as counted:
        grids()
    times = []
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        grids()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    median, tflop = statistics.median(times), counted.get_total_flops() / 1e12
    peak = peak_tflops_of(device)
    mfu = f", MFU {100 * tflop / (median / 1e3) / peak:.1f}%" if peak else ""
    print(f"teacher alone ({batch['frames'].shape[1]} frames, chunk {config.teacher.chunk_size}): "
          f"{median:.1f} ms, {tflop:.4g} TFLOP{mfu}")  # fmt: skip


def print_profile(row: str, step, device: torch.device) -> None:
    """One step of ``row`` under torch.profiler: the 20 operators that took the most device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one {row} step:")
    print(profiled.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
