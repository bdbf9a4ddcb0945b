"""``crepa export``: a trained run's weights in the layout another tool loads, with a model card.

- ``diffusers``: ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(dir)``, with
  the LoRA config as metadata (so alpha / rank is applied).
- ``comfyui``: one safetensors file keyed by the module names of the family's *original* model
  (the names ComfyUI's model classes use), prefixed ``diffusion_model.``, with ``lora_A`` / ``lora_B``
  (or ``lora_down`` / ``lora_up``, the kohya-style names) and one ``alpha`` per module; ComfyUI and
  kohya-style tools scale by alpha / rank. Where the original model fuses projections that diffusers
  splits (HunyuanVideo's ``img_attn_qkv``, Mochi's ``qkv_x``), the split LoRAs are stacked exactly: A's rows stacked, B
  block-diagonal (zero rows for parts without a LoRA), alpha scaled with the stacked rank.
- ``merged``: the transformer with the LoRA folded into its weights, a ``from_pretrained`` folder.

RepVideo gates are copied next to the weights: they change the transformer's forward, so only
crepa-aware loaders (``crepa.repvideo.load``) apply them. Each export writes a hub model card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from safetensors.torch import save_file

from crepa.config import RunConfig
from crepa.data.report import DataReport
from crepa.data.sources import list_source
from crepa.models import ModelFamily
from crepa.models.hub import hub_access
from crepa.models.loading import resolve_family
from crepa.repvideo import trained_gates_state
from crepa.rundir import GATES_FILE, LORA_FILE
from crepa.runs import (
    final_step,
    read_gates,
    read_run_config,
    read_transformer_weights,
)
from crepa.sample import load_run_transformer
from crepa.train.lora import lora_config, save_lora_tensors

ExportFormat = Literal["diffusers", "comfyui", "merged"]
KeyStyle = Literal["peft", "kohya"]
EXPORT_FORMATS: tuple[str, ...] = ("diffusers", "comfyui", "merged")
COMFYUI_FILE = "lora_comfyui.safetensors"
REPVIDEO_NOTE = (
    "The RepVideo gates (`{gates}`) change how the transformer's blocks are fed, so only crepa-aware "
    "loaders apply them (`crepa.repvideo.load(pipeline, run_dir)`); ComfyUI, diffusers' "
    "`load_lora_weights` and other tools load the LoRA without them, which is not the model that was trained."
)


@dataclass(frozen=True)
class ModuleRule:
    """One module of the original model and the diffusers modules it holds, stacked along its output
    rows in this order (one part: a rename). ``{i}`` stands for the block index."""

    original: str
    parts: tuple[str, ...]


def _renames(pairs: dict[str, str]) -> tuple[ModuleRule, ...]:
    return tuple(ModuleRule(original, (diffusers_name,)) for diffusers_name, original in pairs.items())


_WAN = _renames(
    {
        **{
            f"blocks.{{i}}.attn1.{d}": f"blocks.{{i}}.self_attn.{o}"
            for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)
        },
        **{
            f"blocks.{{i}}.attn2.{d}": f"blocks.{{i}}.cross_attn.{o}"
            for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)
        },
        "blocks.{i}.attn2.add_k_proj": "blocks.{i}.cross_attn.k_img",
        "blocks.{i}.attn2.add_v_proj": "blocks.{i}.cross_attn.v_img",
        "blocks.{i}.ffn.net.0.proj": "blocks.{i}.ffn.0",
        "blocks.{i}.ffn.net.2": "blocks.{i}.ffn.2",
    }
)
_LTX_VIDEO = _renames(  # LTX-Video's original modules carry the diffusers names
    {
        f"transformer_blocks.{{i}}.{name}": f"transformer_blocks.{{i}}.{name}"
        for name in (
            *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
            "ff.net.0.proj",
            "ff.net.2",
        )
    }
)
_DOUBLE, _SINGLE = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
_HUNYUANVIDEO = (
    ModuleRule("double_blocks.{i}.img_attn_qkv", tuple(_DOUBLE + f"attn.to_{p}" for p in "qkv")),
    ModuleRule("double_blocks.{i}.txt_attn_qkv", tuple(_DOUBLE + f"attn.add_{p}_proj" for p in "qkv")),
    *_renames(
        {
            _DOUBLE + "attn.to_out.0": "double_blocks.{i}.img_attn_proj",
            _DOUBLE + "attn.to_add_out": "double_blocks.{i}.txt_attn_proj",
            _DOUBLE + "ff.net.0.proj": "double_blocks.{i}.img_mlp.fc1",
            _DOUBLE + "ff.net.2": "double_blocks.{i}.img_mlp.fc2",
            _DOUBLE + "ff_context.net.0.proj": "double_blocks.{i}.txt_mlp.fc1",
            _DOUBLE + "ff_context.net.2": "double_blocks.{i}.txt_mlp.fc2",
            _SINGLE + "proj_out": "single_blocks.{i}.linear2",
        }
    ),
    ModuleRule(
        "single_blocks.{i}.linear1", (*(_SINGLE + f"attn.to_{p}" for p in "qkv"), _SINGLE + "proj_mlp")
    ),
)
_MOCHI_BLOCK = "transformer_blocks.{i}."
_MOCHI = (  # Genmo's checkpoint layout: fused visual (x) and text (y) qkv projections
    ModuleRule("blocks.{i}.attn.qkv_x", tuple(_MOCHI_BLOCK + f"attn1.to_{p}" for p in "qkv")),
    ModuleRule("blocks.{i}.attn.qkv_y", tuple(_MOCHI_BLOCK + f"attn1.add_{p}_proj" for p in "qkv")),
    *_renames(
        {
            _MOCHI_BLOCK + "attn1.to_out.0": "blocks.{i}.attn.proj_x",
            _MOCHI_BLOCK + "attn1.to_add_out": "blocks.{i}.attn.proj_y",
            _MOCHI_BLOCK + "ff.net.2": "blocks.{i}.mlp_x.w2",
            _MOCHI_BLOCK + "ff_context.net.2": "blocks.{i}.mlp_y.w2",
        }
    ),
)
# Module names of the original models, as ComfyUI's model classes name them, per family.
COMFYUI_LAYOUTS: dict[str, tuple[ModuleRule, ...]] = {
    "wan": _WAN,
    "wan_i2v": _WAN,
    "wan2_2_ti2v": _WAN,
    "skyreels_v2": _WAN,
    "ltx_video": _LTX_VIDEO,
    "hunyuanvideo": _HUNYUANVIDEO,
    "mochi": _MOCHI,
}


def _module_of(key: str) -> tuple[str, str]:
    """``blocks.0.attn1.to_q.lora_A.weight`` -> (``blocks.0.attn1.to_q``, ``lora_A``)."""
    module, kind, _ = key.rsplit(".", 2)
    return module, kind


def _block_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def comfyui_state_dict(
    lora: dict[str, torch.Tensor],
    family: ModelFamily,
    alpha: float,
    out_features: dict[str, int],
    key_style: KeyStyle = "peft",
) -> dict[str, torch.Tensor]:
    """LoRA tensors with diffusers module names (``{module}.lora_A.weight`` / ``lora_B``) -> the family's
    ComfyUI layout. ``out_features`` gives the output size of diffusers modules that a fused original
    module holds without a LoRA of their own (their rows of B are zero)."""
    if family.name not in COMFYUI_LAYOUTS:
        raise ValueError(
            f"--format comfyui: crepa knows no ComfyUI key layout for {family.name} (known: "
            f"{', '.join(COMFYUI_LAYOUTS)}); export --format diffusers or merged instead"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        module, kind = _module_of(key)
        modules.setdefault(module, {})[kind] = tensor.float()
    down, up = ("lora_A", "lora_B") if key_style == "peft" else ("lora_down", "lora_up")
    exported: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in COMFYUI_LAYOUTS[family.name]:
        patterns = [_block_pattern(part) for part in rule.parts]
        blocks = sorted(
            {m["i"] for pattern in patterns for name in modules if (m := pattern.match(name))}, key=int
        )
        for block in blocks:
            names = [part.replace("{i}", block) for part in rule.parts]
            present = [name for name in names if name in modules]
            used.update(present)
            a = torch.cat([modules[name]["lora_A"] for name in present])  # (sum r, in)
            rows = [
                modules[name]["lora_B"].shape[0] if name in modules else out_features[name] for name in names
            ]
            b = torch.zeros(sum(rows), a.shape[0])
            row, column = 0, 0
            for name, height in zip(names, rows, strict=True):
                if name in modules:
                    part = modules[name]["lora_B"]
                    b[row : row + height, column : column + part.shape[1]] = part
                    column += part.shape[1]
                row += height
            rank = modules[present[0]]["lora_A"].shape[0]
            prefix = "diffusion_model." + rule.original.replace("{i}", block)
            exported[f"{prefix}.{down}.weight"] = a.contiguous()
            exported[f"{prefix}.{up}.weight"] = b.contiguous()
            exported[f"{prefix}.alpha"] = torch.tensor(alpha * a.shape[0] / rank)  # same alpha / rank
    unmapped = sorted(set(modules) - used)
    if unmapped:
        raise ValueError(
            f"--format comfyui: no ComfyUI name for LoRA module(s) {', '.join(unmapped[:4])} of {family.name}; "
            "export --format diffusers or merged instead"
        )
    return exported


def _fused_out_features(config: RunConfig, family: ModelFamily) -> dict[str, int]:
    """Output size of every linear module of the transformer, from its config (built on the meta device)."""
    transformer_class = getattr(diffusers, family.class_names[0])
    with hub_access(config.model.pretrained, "model.pretrained"):
        transformer_config = transformer_class.load_config(
            config.model.pretrained, subfolder="transformer", revision=config.model.revision
        )
    with torch.device("meta"):
        skeleton = transformer_class.from_config(transformer_config)
    return {
        name: module.out_features
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


# ---------------------------------------------------------------- writing
def _staging(out: Path) -> Path:
    """Where ``out`` is written before it is renamed into place (a leftover of a crashed export is removed)."""
    staged = out.with_name(f".{out.name}.tmp")
    if staged.exists():
        shutil.rmtree(staged) if staged.is_dir() else staged.unlink()
    return staged


def export_run(
    run_dir: str | Path,
    out: str | Path,
    export_format: ExportFormat = "diffusers",
    *,
    checkpoint: str | None = None,
    key_style: KeyStyle = "peft",
    eval_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the run's final weights (or ``checkpoint``'s) to ``out``; returns the written path.

    diffusers / merged: ``out`` is a folder. comfyui: ``out`` is the ``.safetensors`` file (its model
    card is ``<stem>.README.md`` beside it, gates ``<stem>.repvideo_gates.safetensors``) or a folder
    (``lora_comfyui.safetensors`` + ``README.md``). eval_dir: a ``crepa eval`` folder whose table goes
    into the card (default ``RUN_DIR/eval`` when it exists).
    """

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format {export_format!r}: choose from {', '.join(EXPORT_FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    config = read_run_config(run_dir)
    family = resolve_family(config)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it, pick another --out or pass --overwrite")
    if not config.lora.enabled and export_format == "comfyui":
        raise ValueError(
            "--format comfyui: this run fine-tuned the whole transformer (no LoRA); use --format merged"
        )
    if config.lora.enabled and config.lora.variant != "lora" and export_format == "comfyui":
        raise ValueError(
            f"--format comfyui: this run trained lora.variant = {config.lora.variant!r}, whose magnitude "
            "vectors the ComfyUI LoRA layout does not carry; use --format diffusers or merged"
        )
    single_file = export_format == "comfyui" and out.suffix == ".safetensors"
    staged = _staging(out)
    (staged.parent if single_file else staged).mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if export_format == "merged" or not config.lora.enabled:
        _write_merged(run_dir, config, family, checkpoint, staged)
        files["transformer"] = "config.json + diffusion_pytorch_model*.safetensors (from_pretrained)"
    elif export_format == "diffusers":
        tensors = read_transformer_weights(run_dir, config, checkpoint)
        assert tensors is not None
        save_lora_tensors(tensors, family, lora_config(family, config.lora), staged)
        files["LoRA"] = LORA_FILE
    else:
        tensors = read_transformer_weights(run_dir, config, checkpoint)
        assert tensors is not None
        exported = comfyui_state_dict(
            tensors, family, config.lora.alpha, _fused_out_features(config, family), key_style
        )
        target = staged if single_file else staged / COMFYUI_FILE
        save_file(exported, str(target), metadata={"format": "pt", "crepa_family": family.name})
        files["LoRA"] = out.name if single_file else COMFYUI_FILE

    gates_name = f"{out.stem}.{GATES_FILE}" if single_file else GATES_FILE
    card_path = out.with_name(f"{out.stem}.README.md") if single_file else staged / "README.md"
    if config.repvideo.enabled:
        state = trained_gates_state(config.repvideo, read_gates(run_dir, config, checkpoint))
        save_file(state, str(out.with_name(gates_name) if single_file else staged / gates_name))
        files["RepVideo gates"] = gates_name
    card = model_card(
        config, family, run_dir, export_format, checkpoint, files, _eval_table(run_dir, eval_dir)
    )
    card_path.write_text(card, encoding="utf-8")
    if out.exists():  # --overwrite
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staged, out)
    return out


def _write_merged(
    run_dir: Path, config: RunConfig, family: ModelFamily, checkpoint: str | None, directory: Path
) -> None:
    """The run's transformer with the LoRA folded in (diffusers' fuse_lora + unload_lora), saved."""

    transformer = load_run_transformer(
        run_dir, config, family, checkpoint, config.model.torch_dtype(torch.device("cpu"))
    )
    if config.lora.enabled:
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
    transformer.save_pretrained(directory)


# ---------------------------------------------------------------- model card
def _eval_table(run_dir: Path, eval_dir: str | Path | None) -> list[tuple[str, Any, Any, Any]]:
    """(metric, value, sem, clips) rows of a ``crepa eval`` report, if there is one."""
    path = Path(eval_dir) / "metrics.json" if eval_dir is not None else run_dir / "eval" / "metrics.json"
    if not path.is_file():
        if eval_dir is not None:
            raise FileNotFoundError(f"--eval {eval_dir}: no metrics.json (a `crepa eval --out` folder)")
        return []
    metrics = json.loads(path.read_text())["metrics"]
    return [
        (name, entry.get("value"), entry.get("sem"), entry.get("count", entry.get("clips")))
        for name, entry in metrics.items()
    ]


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(
    config: RunConfig,
    family: ModelFamily,
    run_dir: Path,
    export_format: str,
    checkpoint: str | None,
    files: dict[str, str],
    eval_rows: list[tuple[str, Any, Any, Any]],
) -> str:
    """README.md in the hub's model card format: YAML front matter, then what the model is and how to load it."""
    base = config.model.pretrained
    lora = config.lora.enabled
    task = "image-to-video" if "ImageToVideo" in family.pipeline_class else "text-to-video"
    tags = ["crepa", "video", task, family.name, "diffusers", *(["lora"] if lora else [])]
    if config.repvideo.enabled:
        tags.append("repvideo")
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        *([f"base_model_relation: {'adapter' if lora and export_format != 'merged' else 'finetune'}"]),
        "library_name: diffusers",
        f"pipeline_tag: {task}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
    ]
    align = config.crepa
    steps = final_step(run_dir) if checkpoint is None else int(checkpoint.removeprefix("step-"))
    lines = [
        f"# {run_dir.name}: {'LoRA' if lora else 'fine-tune'} of {base} trained with crepa",
        "",
        f"- Model family: `{family.name}` ({family.class_names[0]}, pipeline {family.pipeline_class})",
        f"- Weights: {'final' if checkpoint is None else checkpoint}, {_number(steps)} training steps, "
        f"learning rate {config.optim.lr:g}, batch size {config.train.batch_size}",
    ]
    if lora:
        lines.append(f"- LoRA: rank {config.lora.rank}, alpha {config.lora.alpha:g}")
    if align.enabled:
        lines.append(
            f"- Alignment: {'CREPA' if align.mode == 'crepa' else align.mode} (weight {align.weight:g}, block "
            f"{align.block_index}, distance {align.distance}, tau {align.tau:g}), teacher `{config.teacher.name}`"
        )
    else:
        lines.append("- Alignment: none (diffusion loss only)")
    if config.repvideo.enabled:
        lines.append(
            f"- RepVideo: window {config.repvideo.window}, include_text {config.repvideo.include_text}"
        )
    lines += ["", "## Files", "", *(f"- {label}: `{name}`" for label, name in files.items())]
    if config.repvideo.enabled:
        lines += ["", REPVIDEO_NOTE.format(gates=files["RepVideo gates"])]
    lines += ["", "## Use", "", *_usage(family, export_format, files)]
    captions = training_captions(config)
    if captions:
        lines += ["", "## Training captions (sample)", "", *(f"- {caption}" for caption in captions)]
    prompts = config.validation.prompts
    if prompts:
        lines += ["", "## Validation prompts", "", *(f"- {prompt}" for prompt in prompts[:8])]
    if eval_rows:
        lines += [
            "",
            "## Evaluation (`crepa eval`)",
            "",
            "| metric | value | ± sem | clips |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {_number(v)} | {_number(s)} | {_number(n)} |" for name, v, s, n in eval_rows]
    return "\n".join([*front, "", *lines]) + "\n"


def training_captions(config: RunConfig, count: int = 5) -> list[str]:
    """The first ``count`` captions of the run's training data (its trigger words), if it is still readable."""
    captions = []
    for source in config.data.dataset_sources():
        try:
            entries = list_source(
                source.path, DataReport(), config.data.video_column, config.data.caption_column
            )
        except (OSError, ValueError):  # the data moved or is not on this machine: the card goes without
            continue
        captions += [" ".join((source.caption_prefix + entry.caption).split()) for entry in entries]
    return captions[:count]


def _usage(family: ModelFamily, export_format: str, files: dict[str, str]) -> list[str]:
    if export_format == "comfyui":
        return [
            f"Put `{files['LoRA']}` in ComfyUI's `models/loras` and load it with a LoRA loader node on the "
            f"{family.name} model (keys: `diffusion_model.` + the original model's module names, with alpha)."
        ]
    if export_format == "merged" or "transformer" in files:
        return [
            "```python",
            f"transformer = diffusers.{family.class_names[0]}.from_pretrained(path)",
            f"pipeline = diffusers.{family.pipeline_class}.from_pretrained(base_model, transformer=transformer)",
            "```",
        ]
    return [
        "```python",
        f"pipeline = diffusers.{family.pipeline_class}.from_pretrained(base_model)",
        "pipeline.load_lora_weights(path)",
        "```",
    ]
