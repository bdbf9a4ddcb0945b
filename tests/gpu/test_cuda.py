"""The paths that exist only on a GPU: mixed precision over fp32 trainables, pinned host memory, the
teacher's autocast, exact resume with CUDA RNG state, NCCL process groups, ``model.compile``, sampling
with offload / VAE tiling / out-of-memory halving, eval extractors and precompute on CUDA against the
CPU. ``pytest -m gpu`` runs them (``make gpu-check`` too); they skip where there is no CUDA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crepa.cache.dataset import CachedDataset
from crepa.config import load_config
from crepa.precompute import precompute
from crepa.train.batches import BucketedBatchOrder, batch_loader
from crepa.train.recipe import train
from crepa.train.step import to_device
from helpers import write_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples/accelerate"
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory) -> Path:
    """A tiny Wan world precomputed on the GPU."""
    run = write_world(tmp_path_factory.mktemp("gpu-world"), "wan")
    precompute(load_config(run), progress=False)
    return run


def cli_env(**extra: str) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", **extra}


def trained(config) -> dict[str, torch.Tensor]:
    return load_file(
        config.output.dir / "checkpoints" / f"step-{config.train.max_steps:06d}/trainable.safetensors"
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_weights_train_fp32_trainables_on_cuda(wan_run, dtype):
    """bf16: autocast over fp32 LoRA / projector; fp16: the same with the gradient scaler."""
    config = load_config(wan_run, [f'model.dtype="{dtype}"', "train.max_steps=3", f'output.dir="{dtype}"'])
    torch.cuda.reset_peak_memory_stats()
    summary = train(config, progress=False)
    assert summary.steps == 3 and summary.skipped_nonfinite == 0
    assert summary.peak_memory_mb > 0 and summary.device.startswith("cuda:")  # it ran on the GPU
    tensors = trained(config)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(".lora_A." in k for k in tensors) and any(k.startswith("projector.") for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_fp16_loss_scale_search_is_not_a_divergence(wan_run, monkeypatch):
    """GradScaler started at 2**60 overflows on each of 12 steps: that is its search for a scale (halved
    every time, the update skipped), not 12 non-finite steps; the run ends normally, nothing counted
    against train.max_nonfinite_steps (10)."""
    original = torch.amp.GradScaler.__init__

    def huge_start(self, *args, **kwargs):
        kwargs["init_scale"] = 2.0**60
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_start)
    config = load_config(wan_run, ['model.dtype="fp16"', "train.max_steps=12", 'output.dir="fp16-search"'])
    summary = train(config, progress=False)
    assert summary.steps == 12 and summary.skipped_nonfinite == 0


def test_pinned_loader_and_non_blocking_copies_give_the_cached_batches(wan_run):
    dataset = CachedDataset(load_config(wan_run).cache.dir)
    order = BucketedBatchOrder(dataset.buckets, 2, seed=3)
    pinned = next(batch_loader(dataset, order, 0, 2, pin_memory=True))
    plain = next(batch_loader(dataset, order, 0, 0, pin_memory=False))
    tensors = {k: v for k, v in pinned.items() if isinstance(v, torch.Tensor)}
    assert tensors and all(v.is_pinned() for v in tensors.values())
    on_gpu = to_device(pinned, CUDA)
    torch.cuda.synchronize()
    for key in tensors:
        assert on_gpu[key].device.type == "cuda" and torch.equal(on_gpu[key].cpu(), plain[key]), key


def test_teacher_autocast_on_cuda_agrees_with_fp32_on_cpu(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from crepa.teachers import load_teacher

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    frames = torch.rand(5, 3, 56, 84)
    cpu = load_teacher(tmp_path / "dino", device="cpu")(frames)
    gpu_teacher = load_teacher(tmp_path / "dino", device="cuda")
    gpu = gpu_teacher(frames)
    assert (
        gpu.device.type == "cuda" and gpu.dtype == torch.float32 and gpu.shape == cpu.shape == (5, 4, 6, 64)
    )
    cosine = torch.nn.functional.cosine_similarity(gpu.cpu(), cpu, dim=-1)
    assert cosine.min() > 0.99, cosine.min()  # bf16 autocast: close to fp32, not equal
    assert not torch.equal(gpu.cpu(), cpu)  # autocast really ran in bf16


def test_resume_on_cuda_is_exact(wan_run):
    """4 steps straight == 2 steps, then resume to 4 (CUDA RNG state restored, deterministic kernels;
    warn_only, as cuBLAS's deterministic mode needs CUBLAS_WORKSPACE_CONFIG before its first use: a
    mismatch names the kernels torch warned have no deterministic version)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            straight = load_config(wan_run, ["train.max_steps=4", 'output.dir="straight"'])
            train(straight, progress=False)
            train(load_config(wan_run, ["train.max_steps=2", 'output.dir="resumed"']), progress=False)
            resumed = load_config(wan_run, ["train.max_steps=4", 'output.dir="resumed"'])
            train(resumed, resume="latest", progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    nondeterministic = sorted({str(w.message)[:160] for w in caught if "deterministic" in str(w.message)})
    a, b = trained(straight), trained(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), nondeterministic


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_nccl_process_group_trains(wan_run, sharded):
    """DDP and FSDP2 over NCCL: one process per GPU, two where two GPUs exist."""
    processes = min(2, torch.cuda.device_count())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = f"nccl-{'fsdp' if sharded else 'ddp'}"
    train_args = [
        *("-m", "crepa", "train", str(wan_run), "--no-progress", "--set", "train.max_steps=2"),
        *("--set", "train.batch_size=1", "--set", f'output.dir="{output}"', "--set", 'model.dtype="bf16"'),
    ]
    if sharded:
        command = [
            *("accelerate", "launch", "--config_file", str(EXAMPLES / "fsdp.yaml")),
            *("--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port)),
            *("--mixed_precision", "bf16", "--dynamo_backend", "no", *train_args),
        ]
    else:  # torchrun: accelerate's --multi_gpu refuses one process, an NCCL group of one is still DDP
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)),
            *("--master_port", str(port), *train_args),
        ]
    result = subprocess.run(
        command, cwd=wan_run.parent, capture_output=True, text=True, timeout=300, env=cli_env()
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((wan_run.parent / output / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["processes"] == processes
    assert summary["parallelism"] in (("fsdp",) if sharded else ("ddp", "single"))
    assert len(set(summary["rank_weight_checksums"])) == 1


def test_compiled_blocks_train_on_cuda(wan_run):
    config = load_config(wan_run, ["model.compile=true", "train.max_steps=2", 'output.dir="compiled"'])
    summary = train(config, progress=False)
    assert summary.steps == 2 and summary.skipped_nonfinite == 0
    assert all(torch.isfinite(t).all() for t in trained(config).values())


@pytest.fixture(scope="module")
def lora_run(wan_run) -> Path:
    config = load_config(wan_run, ["train.max_steps=2", 'output.dir="for-sampling"'])
    train(config, progress=False)
    return config.output.dir


def sampled_frames(out: Path) -> np.ndarray:
    from crepa.io.video import read_video_frames

    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return np.stack([read_video_frames(out / record["file"])[0] for record in records])


def test_sample_offload_and_vae_tiling_on_cuda(lora_run, tmp_path):
    from crepa.sample import sample_run

    common = dict(prompts=["a red stripe pattern"], seeds=[0], device="cuda", inference_steps=2)
    plain = sampled_frames(Path(sample_run(lora_run, out=tmp_path / "plain", **common)).parent)
    offload = sampled_frames(
        Path(sample_run(lora_run, out=tmp_path / "offload", offload=True, **common)).parent
    )
    tiled = sampled_frames(
        Path(sample_run(lora_run, out=tmp_path / "tiled", vae_tiling=True, **common)).parent
    )
    assert plain.shape == offload.shape == tiled.shape
    # offload moves the same weights at the same dtype: the same clip up to kernel differences
    assert np.abs(plain.astype(int) - offload.astype(int)).mean() < 2
    assert np.abs(plain.astype(int) - tiled.astype(int)).mean() < 8  # tiles blend at their seams


def test_batch_size_halves_on_a_real_out_of_memory(lora_run, capsys):
    """The allocator is capped at what the model needs plus ~2.5 clips' working memory: a call of 4
    clips runs out of memory for real, the sampler halves the batch and still returns every clip in
    order, the first equal to the same clip generated alone."""
    from crepa.generation import GenerationSettings, generate_clips
    from crepa.sample import load_run_pipeline, requests_for

    run = load_run_pipeline(lora_run, device="cuda")
    settings = GenerationSettings.from_validation(
        run.config.validation, num_frames=33, height=256, width=256, inference_steps=1
    )
    requests = [request for _, request in requests_for(["a red stripe pattern"], [0, 1, 2, 3])]
    alone = next(generate_clips(run.pipeline, run.family, requests[:1], settings, batch_size=1))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    list(generate_clips(run.pipeline, run.family, requests[:1], settings, batch_size=1))
    resident = torch.cuda.memory_allocated()
    need_one = torch.cuda.max_memory_allocated() - resident
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((resident + 2.5 * need_one + (32 << 20)) / total)
    try:
        clips = list(
            generate_clips(run.pipeline, run.family, requests, settings, batch_size=4, progress=True)
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert [clip.request.seed for clip in clips] == [0, 1, 2, 3]
    # batched bf16 kernels may round differently from a call of one clip
    assert np.abs(clips[0].frames.astype(int) - alone.frames.astype(int)).mean() < 2
    assert "out of memory" in capsys.readouterr().err


def test_eval_extractors_on_cuda_agree_with_cpu(tmp_path):
    from crepa.eval.extractors import load_extractor
    from crepa.eval.tiny import save_tiny_extractors

    tiny = save_tiny_extractors(tmp_path / "extractors")
    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    for kind in ("dino", "clip"):
        cpu = load_extractor(f"{kind}:{tiny[kind]}", device="cpu")(frames)
        gpu = load_extractor(f"{kind}:{tiny[kind]}", device="cuda")(frames)
        assert gpu.shape == cpu.shape
        assert torch.allclose(gpu.float().cpu(), cpu.float(), rtol=1e-2, atol=1e-2), kind


def test_precompute_on_cuda_agrees_with_the_cpu_cache(wan_run, tmp_path):
    """The same clips precomputed on the CPU (a process that sees no GPU) and on CUDA (bf16 autocast):
    latents within 5 % of their scale, teacher grids at cosine > 0.99, text embeddings close."""
    cpu_run = wan_run.parent
    result = subprocess.run(
        [sys.executable, "-m", "crepa", "precompute", str(wan_run), "--no-progress",
         "--set", 'cache.dir="cache-cpu"'],
        cwd=cpu_run, capture_output=True, text=True, timeout=300, env=cli_env(CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    gpu_cache = CachedDataset(load_config(wan_run).cache.dir)
    cpu_cache = CachedDataset(cpu_run / "cache-cpu")
    assert len(gpu_cache) == len(cpu_cache) > 0
    for index in range(len(gpu_cache)):
        g, c = gpu_cache[index], cpu_cache[index]
        scale = c["latents"].float().abs().mean()
        assert (g["latents"].float() - c["latents"].float()).abs().mean() < 0.05 * scale
        cosine = torch.nn.functional.cosine_similarity(g["teacher"].float(), c["teacher"].float(), dim=-1)
        assert cosine.min() > 0.99
