"""`crepa export`: the comfyui file maps back (by a mapping written here) to the diffusers LoRA
tensor for tensor, diffusers' own loader reads both files to the trained model, HunyuanVideo's fused
projections hold exactly the split LoRAs, and the merged folder loads with from_pretrained as base + LoRA."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from crepa.cli import app
from crepa.config import LoraSection
from crepa.export import COMFYUI_LAYOUTS, comfyui_state_dict
from crepa.models import get_family
from crepa.models.tiny import TINY_MODELS, tiny_inputs, tiny_transformer
from crepa.runs import read_run_config
from crepa.sample import load_run_transformer
from crepa.train.lora import add_lora, lora_state_dict
from helpers import train_run

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: a loader that ignores alpha gets another model
WAN_TARGETS = (
    r"^blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_out\.0)|ffn\.net\.(0\.proj|2))$"
)
# Original Wan module name -> diffusers module name, written from the Wan 2.1 checkpoint layout
WAN_ORIGINAL_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory) -> Path:
    """A finished 2-step LoRA + RepVideo run of a 4-block tiny Wan (block 2 gated), eval folder included."""
    root = tmp_path_factory.mktemp("export-run")
    overrides = [
        *(f"lora.rank={RANK}", f"lora.alpha={ALPHA}", f"lora.targets='{WAN_TARGETS}'", "validation.every=0"),
        *("repvideo.enabled=true", "repvideo.window=2", "repvideo.gate_init=0.5", "repvideo.lr=0.2"),
    ]
    run_dir = train_run(root, overrides, four_blocks=True)
    (run_dir / "eval").mkdir()
    metrics = {"metrics": {"temporal_flickering": {"value": 0.9512, "sem": 0.01, "count": 4}}}
    (run_dir / "eval/metrics.json").write_text(json.dumps(metrics))
    return run_dir


def export(run_dir: Path, out: Path, *args: str) -> Result:
    """`crepa export` in this process (the command's own parsing and exit codes)."""
    return CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), *args])


def test_comfyui_export_maps_back_to_the_diffusers_lora(wan_run, tmp_path):
    assert export(wan_run, tmp_path / "diffusers").exit_code == 0
    diffusers_lora = load_file(tmp_path / "diffusers/pytorch_lora_weights.safetensors")
    for keys, (down, up) in (("peft", ("lora_A", "lora_B")), ("kohya", ("lora_down", "lora_up"))):
        result = export(wan_run, tmp_path / f"{keys}.safetensors", "--format", "comfyui", "--keys", keys)
        assert result.exit_code == 0, result.output
        comfy = load_file(tmp_path / f"{keys}.safetensors")
        back = {}
        for key, tensor in comfy.items():
            match = re.fullmatch(
                rf"diffusion_model\.blocks\.(\d+)\.(.+)\.({down}\.weight|{up}\.weight|alpha)", key
            )
            assert match, key
            block, module, kind = match.groups()
            if kind == "alpha":
                assert (
                    tensor.item() == ALPHA
                )  # ComfyUI scales by alpha / rank, rank = rows of the down matrix
                continue
            name = "lora_A" if kind.startswith(down) else "lora_B"
            back[f"transformer.blocks.{block}.{WAN_ORIGINAL_TO_DIFFUSERS[module]}.{name}.weight"] = tensor
        assert back.keys() == diffusers_lora.keys() and len(comfy) == len(back) * 3 // 2
        for key, tensor in diffusers_lora.items():
            assert torch.equal(back[key], tensor), key
        assert any(t.abs().sum() > 0 for k, t in back.items() if "lora_B" in k)  # trained, not the zero init


def test_diffusers_loader_reads_both_exports_as_the_trained_model(wan_run, tmp_path):
    """diffusers' load_lora_weights, with its own converter for the comfyui file, plus crepa.repvideo.load,
    gives the transformer crepa trained (alpha / rank applied)."""
    import crepa.repvideo

    assert export(wan_run, tmp_path / "d").exit_code == 0
    assert export(wan_run, tmp_path / "c.safetensors", "--format", "comfyui").exit_code == 0
    config = read_run_config(wan_run)
    family = get_family("wan")
    trained = load_run_transformer(wan_run, config, family, None, torch.float32)
    inputs = tiny_inputs("wan", trained, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(**inputs)[0]
        for source in (tmp_path / "d", tmp_path / "c.safetensors"):
            pipeline = diffusers.WanPipeline.from_pretrained(config.model.pretrained)
            pipeline.load_lora_weights(source)
            crepa.repvideo.load(pipeline, wan_run)
            torch.testing.assert_close(pipeline.transformer(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
        base = diffusers.WanTransformer3DModel.from_pretrained(Path(config.model.pretrained) / "transformer")
        assert (base(**inputs)[0] - expected).abs().max() > 1e-3  # the LoRA and gates matter


def test_merged_export_is_base_plus_lora(wan_run, tmp_path):
    result = export(wan_run, tmp_path / "merged", "--format", "merged")
    assert result.exit_code == 0, result.output
    config = read_run_config(wan_run)
    family = get_family("wan")
    merged = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = load_run_transformer(wan_run, config, family, None, torch.float32)
    import crepa.repvideo

    crepa.repvideo.load(merged, wan_run)  # the gates are not weights: applied beside the merged transformer
    inputs = tiny_inputs("wan", reference, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs)[0], reference(**inputs)[0], atol=1e-5, rtol=1e-5)


def test_export_writes_gates_and_a_hub_model_card(wan_run, tmp_path):
    assert export(wan_run, tmp_path / "lora.safetensors", "--format", "comfyui").exit_code == 0
    gates = load_file(tmp_path / "lora.repvideo_gates.safetensors")
    assert torch.equal(gates["gate"], load_file(wan_run / "repvideo_gates.safetensors")["gate"])
    card = (tmp_path / "lora.README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert f'base_model: "{read_run_config(wan_run).model.pretrained}"' in front
    assert "library_name: diffusers" in front and "- lora" in front and "- wan" in front
    assert "2 training steps" in body and "rank 4, alpha 8" in body and "only crepa-aware" in body
    assert "Training captions (sample)\n\n- a red stripe pattern moves left\n" in body  # the data's captions
    assert "Validation prompts\n\n- a red stripe pattern\n" in body
    assert "| temporal_flickering | 0.9512 | 0.01 | 4 |" in body
    result = export(wan_run, tmp_path / "lora.safetensors", "--format", "comfyui")
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = export(wan_run, tmp_path / "x", "--format", "comfyui", "--checkpoint", "step-000009")
    assert result.exit_code == 2 and "step-000001, step-000002" in result.output
    killed = tmp_path / "killed"  # a run stopped before its first checkpoint
    killed.mkdir()
    shutil.copy(wan_run / "run_config.json", killed)
    result = export(killed, tmp_path / "y", "--format", "comfyui")
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no checkpoints yet in {killed / 'checkpoints'}" in output, output


def test_hunyuanvideo_fused_projections_hold_the_split_loras():
    """double_blocks.i.img_attn_qkv stacks to_q / to_k / to_v, single_blocks.i.linear1 also proj_mlp
    (no LoRA: zero rows). Reconstructed here: each part's rows of (alpha'/rank') B A equal (alpha/r) B_p A_p."""
    family = get_family("hunyuanvideo")
    transformer = tiny_transformer("hunyuanvideo")
    linears = {n: m.out_features for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    add_lora(transformer, family, LoraSection(rank=2, alpha=3.0))
    generator = torch.Generator().manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator)
    lora = lora_state_dict(transformer)
    exported = comfyui_state_dict(lora, family, 3.0, linears)
    delta = {}
    for key in exported:
        if key.endswith(".alpha"):
            prefix = key.removesuffix(".alpha")
            down, up = (
                exported[f"{prefix}.lora_A.weight"].double(),
                exported[f"{prefix}.lora_B.weight"].double(),
            )
            delta[prefix.removeprefix("diffusion_model.")] = exported[key].item() / down.shape[0] * up @ down
    checked = 0
    for block in range(len(transformer.transformer_blocks)):
        parts = [f"transformer_blocks.{block}.attn.to_{p}" for p in "qkv"]
        checked += _check_rows(delta[f"double_blocks.{block}.img_attn_qkv"], parts, lora, linears)
        checked += _check_rows(
            delta[f"double_blocks.{block}.img_attn_proj"], [parts[0][:-4] + "to_out.0"], lora, linears
        )
    for block in range(len(transformer.single_transformer_blocks)):
        parts = [
            f"single_transformer_blocks.{block}.{p}"
            for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ]
        checked += _check_rows(delta[f"single_blocks.{block}.linear1"], parts, lora, linears)
    assert checked == len(lora) // 2 and len(exported) == 3 * len(delta)


def _check_rows(delta: torch.Tensor, parts: list[str], lora: dict, linears: dict) -> int:
    """Rows of ``delta`` part by part against (alpha / r) B A of each part's LoRA (zero without one)."""
    row, found = 0, 0
    for part in parts:
        rows = delta[row : row + linears[part]]
        if f"{part}.lora_A.weight" in lora:
            a, b = lora[f"{part}.lora_A.weight"].double(), lora[f"{part}.lora_B.weight"].double()
            torch.testing.assert_close(rows, 3.0 / 2 * b @ a)
            found += 1
        else:
            assert rows.abs().max() == 0
        row += linears[part]
    assert row == delta.shape[0]
    return found


@pytest.mark.parametrize(
    "name", [name for name, tiny in TINY_MODELS.items() if tiny.family in COMFYUI_LAYOUTS]
)
def test_comfyui_layout_covers_the_default_lora_and_keeps_every_update(name):
    """Every module the family's default LoRA targets gets a ComfyUI name, and the weight updates
    (alpha / rank) B A keep their total size: the sum of squared norms is the same on both sides."""
    tiny = TINY_MODELS[name]
    family = get_family(tiny.family)
    transformer = tiny_transformer(name)
    linears = {n: m.out_features for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    add_lora(transformer, family, LoraSection(rank=2, alpha=5.0))
    generator = torch.Generator().manual_seed(0)
    for parameter_name, param in transformer.named_parameters():
        if "lora_B" in parameter_name:
            param.data = torch.randn(param.shape, generator=generator)
    lora = lora_state_dict(transformer)
    exported = comfyui_state_dict(lora, family, 5.0, linears, key_style="kohya")

    def squared(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
        return float(((scale * up.double() @ down.double()) ** 2).sum())

    expected = sum(
        squared(lora[key], lora[key.replace("lora_A", "lora_B")], 5.0 / 2) for key in lora if "lora_A" in key
    )
    prefixes = [key.removesuffix(".alpha") for key in exported if key.endswith(".alpha")]
    found = sum(
        squared(
            exported[f"{p}.lora_down.weight"],
            exported[f"{p}.lora_up.weight"],
            exported[f"{p}.alpha"].item() / exported[f"{p}.lora_down.weight"].shape[0],
        )
        for p in prefixes
    )
    assert all(p.startswith("diffusion_model.") for p in prefixes) and len(exported) == 3 * len(prefixes)
    assert found == pytest.approx(expected, rel=1e-9) and expected > 0
