"""`crepa sample` on tiny saved pipelines: the clip of a (prompt, seed) is bitwise the clip training
validation wrote at the same step (LoRA run, RepVideo run, final weights and checkpoints), and the
samples.jsonl it writes feeds `crepa eval` unchanged."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import cv2
import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import crepa.repvideo
import crepa.sample
from crepa.cli import app
from crepa.config import ConfigError, load_config
from crepa.export import export_run
from crepa.generation import ClipRequest, GenerationSettings, generate_clips
from crepa.io.video import read_video_frames
from crepa.precompute import precompute
from crepa.runs import RunDirectoryError, read_run_config
from crepa.sample import load_run_pipeline, sample_run
from crepa.train.recipe import train
from helpers import FAMILY_RUN, PROMPTS, SEED, train_run, write_world


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("lora-run"), [])


def frames_of(path: Path) -> np.ndarray:
    return read_video_frames(path)[0]


def manifest_record(clip: Path) -> dict:
    """The samples.jsonl line of ``clip`` (an mp4 written by validation or crepa sample)."""
    records = [json.loads(line) for line in (clip.parent / "samples.jsonl").read_text().splitlines()]
    return next(record for record in records if record["file"] == clip.name)


def assert_same_clip(sampled: Path, validation: Path) -> None:
    """The sampled clip is bitwise the validation clip: the GIFs decode to the same frames and the
    uint8 frames hashed before encoding are equal. (Not the mp4s: x264 may encode the same frames
    a little differently from run to run, so their decoded frames only agree closely.)"""
    a, b = frames_of(sampled.with_suffix(".gif")), frames_of(validation.with_suffix(".gif"))
    assert a.shape == b.shape and np.array_equal(a, b)
    assert manifest_record(sampled)["frames_sha256"] == manifest_record(validation)["frames_sha256"]
    a, b = frames_of(sampled), frames_of(validation)
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 2


def test_sample_reproduces_validation_of_a_lora_run(lora_run, tmp_path):
    validation = lora_run / "validation"
    # the two steps' validation clips differ, so loading the wrong weights cannot pass
    assert not np.array_equal(
        frames_of(validation / "step-000001/prompt-0.gif"), frames_of(validation / "step-000002/prompt-0.gif")
    )
    final = sample_run(lora_run, PROMPTS, [SEED, SEED + 1], tmp_path / "final")
    assert_same_clip(tmp_path / "final/prompt-0-seed-5.mp4", validation / "step-000002/prompt-0.mp4")
    assert_same_clip(tmp_path / "final/prompt-1-seed-6.mp4", validation / "step-000002/prompt-1.mp4")
    early = sample_run(lora_run, PROMPTS[:1], [SEED], tmp_path / "early", checkpoint="step-000001")
    assert_same_clip(tmp_path / "early/prompt-0-seed-5.mp4", validation / "step-000001/prompt-0.mp4")

    records = [json.loads(line) for line in final.read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, s) for p in PROMPTS for s in (SEED, SEED + 1)]
    assert records[0]["settings"]["inference_steps"] == 2 and records[0]["checkpoint"] == "final"
    assert json.loads(early.read_text())["checkpoint"] == "step-000001"
    assert (tmp_path / "final/contact_sheet.png").stat().st_size > 0


def test_sample_and_export_a_full_fine_tuning_run(tmp_path):
    overrides = ["lora.enabled=false", "optim.lr=0.001", f"validation.prompts={json.dumps(PROMPTS[:1])}"]
    run_dir = train_run(tmp_path / "world", overrides)
    validation = run_dir / "validation"
    assert not np.array_equal(
        frames_of(validation / "step-000001/prompt-0.gif"), frames_of(validation / "step-000002/prompt-0.gif")
    )
    sample_run(run_dir, PROMPTS[:1], [SEED], tmp_path / "final")  # the saved transformer/ folder
    assert_same_clip(tmp_path / "final/prompt-0-seed-5.mp4", validation / "step-000002/prompt-0.mp4")
    sample_run(run_dir, PROMPTS[:1], [SEED], tmp_path / "early", checkpoint="1")  # checkpoint parameters
    assert_same_clip(tmp_path / "early/prompt-0-seed-5.mp4", validation / "step-000001/prompt-0.mp4")
    # a full fine-tune exports its transformer: the checkpoint's parameters, loadable with from_pretrained
    export_run(run_dir, tmp_path / "merged", "merged", checkpoint="step-000001")
    exported = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "merged").state_dict()
    saved = load_file(run_dir / "checkpoints/step-000001/trainable.safetensors")
    assert len(saved) == len(dict(exported.items()))
    for key, tensor in saved.items():
        assert torch.equal(exported[key.removeprefix("transformer.")], tensor), key


def test_batched_sampling_matches_one_at_a_time(lora_run, monkeypatch, capsys):
    run = load_run_pipeline(lora_run)
    settings = GenerationSettings.from_validation(run.config.validation)
    requests = [ClipRequest(PROMPTS[0], 3), ClipRequest(PROMPTS[1], 4), ClipRequest(PROMPTS[0], 4)]

    def clips(batch_size: int) -> list[np.ndarray]:
        generated = generate_clips(run.pipeline, run.family, requests, settings, batch_size=batch_size)
        return [clip.frames for clip in generated]

    alone, batched = clips(1), clips(2)
    for a, b in zip(alone, batched, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float summation order, then rounding
    assert not np.array_equal(alone[1], alone[2])  # same seed, other prompt: the prompts reach the model

    # a GPU with room for two clips per call: 4 fails, 3 fails, then 2 + 1 (the same calls as above)
    pipeline_call = type(run.pipeline).__call__

    @functools.wraps(pipeline_call)
    def two_fit(self, *args, **kwargs):
        if isinstance(kwargs["prompt"], list) and len(kwargs["prompt"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return pipeline_call(self, *args, **kwargs)

    monkeypatch.setattr(type(run.pipeline), "__call__", two_fit)
    capsys.readouterr()
    fallback = clips(4)
    assert all(np.array_equal(a, b) for a, b in zip(fallback, [*batched[:2], alone[2]], strict=True))
    said = capsys.readouterr()
    assert (
        "out of memory: 3 clips per call is too many, trying 2" in said.err
        and "out of memory" not in said.out
    )


def test_samples_jsonl_feeds_crepa_eval(lora_run, tmp_path):
    manifest = sample_run(lora_run, PROMPTS, [0], tmp_path / "clips", fps=4.0)
    out = tmp_path / "eval"
    arguments = [
        "eval",
        str(manifest.parent),
        "--out",
        str(out),
        "--metrics",
        "temporal_flickering",
        "--no-progress",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output[-2000:]
    with open(out / "per_video.csv") as handle:
        rows = list(csv.DictReader(handle))
    # the manifest's mp4 files (not the GIFs next to them), captioned with their prompts
    assert [(row["name"], row["caption"]) for row in rows] == [
        ("prompt-0-seed-0.mp4", PROMPTS[0]),
        ("prompt-1-seed-0.mp4", PROMPTS[1]),
    ]
    for row in rows:  # VBench's flicker score, computed here from the decoded frames
        frames = frames_of(tmp_path / "clips" / row["name"]).astype(np.float64)
        expected = (255 - np.abs(np.diff(frames, axis=0)).mean()) / 255
        assert float(row["temporal_flickering"]) == pytest.approx(expected, abs=1e-9)
        assert float(row["fps"]) == 4.0


def test_sample_cli_reproduces_validation_of_a_repvideo_run(tmp_path, monkeypatch, run_cli):
    rep = ["repvideo.enabled=true", "repvideo.window=2", "repvideo.gate_init=0.5", "repvideo.lr=0.2"]
    rep.append("train.max_steps=1")  # the checkpoint and validation of step 1 are all this test reads
    run_dir = train_run(tmp_path / "world", rep, four_blocks=True)
    (tmp_path / "prompts.txt").write_text(f"# held-out\n{PROMPTS[1]}\n\n")
    result = run_cli(
        *("sample", str(run_dir), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", str(SEED + 1)),
        *("--checkpoint", "step-000001", "--out", str(tmp_path / "s"), "--no-progress"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    validation = run_dir / "validation/step-000001/prompt-1.mp4"
    assert_same_clip(tmp_path / "s/prompt-0-seed-6.mp4", validation)
    # without its gates the run's transformer gives another clip: the gates were applied
    monkeypatch.setattr(crepa.sample.repvideo, "load", lambda *args, **kwargs: None)
    sample_run(run_dir, PROMPTS[1:], [SEED + 1], tmp_path / "plain", checkpoint="step-000001")
    assert not np.array_equal(
        frames_of(tmp_path / "plain/prompt-0-seed-6.gif"), frames_of(validation.with_suffix(".gif"))
    )


def test_sample_explains_bad_input(lora_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames/first.png"), np.zeros((32, 32, 3), np.uint8))
    killed, unfinished = tmp_path / "killed", tmp_path / "unfinished"  # stopped before / after a checkpoint
    for run_dir in (killed, unfinished):
        run_dir.mkdir()
        shutil.copy(lora_run / "run_config.json", run_dir)
    shutil.copytree(lora_run / "checkpoints", unfinished / "checkpoints")
    no_checkpoint = (
        f"the run has no checkpoints yet in {killed / 'checkpoints'} (training saves one every "
        "train.checkpoint_every steps"
    )
    cases = {
        f"{killed}: no pytorch_lora_weights.safetensors: the run has not finished, and {no_checkpoint}": [
            str(killed)
        ],
        f"checkpoint step-000001: not in {killed / 'checkpoints'}; {no_checkpoint}": [
            str(killed),
            "--checkpoint",
            "step-000001",
        ],
        "the run has not finished; give one of its checkpoints with --checkpoint (checkpoints there: "
        "step-000001, step-000002)": [str(unfinished)],
        "not a crepa run directory": [str(tmp_path)],
        "checkpoint step-000009: not in": [str(lora_run), "--checkpoint", "step-000009"],
        "expected integers": [str(lora_run), "--seeds", "one"],
        "on the CPU already": [str(lora_run), "--offload", "--device", "cpu"],
        "generates from text only": [str(lora_run), "--images", str(tmp_path / "frames")],
    }
    for message, args in cases.items():
        result = CliRunner().invoke(app, ["sample", *args, "--prompts", str(tmp_path / "prompts.txt")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    transformer = diffusers.WanTransformer3DModel.from_pretrained(
        read_run_config(lora_run).model.pretrained, subfolder="transformer"
    )
    with pytest.raises(RunDirectoryError, match="did not train RepVideo"):
        crepa.repvideo.load(transformer, lora_run)
    assert not transformer._forward_pre_hooks  # nothing was installed


def test_every_command_renders_its_help():
    """Rich markup in help texts (a bracketed word) breaks --help; every command's help must render."""
    commands = [info.name or info.callback.__name__ for info in app.registered_commands]
    assert {"sample", "export", "eval", "train"} <= set(commands)
    for command in commands:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output[-500:])


@pytest.mark.parametrize("name", ["cogvideox_i2v", pytest.param("wan_i2v", marks=pytest.mark.slow)])
def test_sample_with_first_frames_reproduces_image_to_video_validation(tmp_path, name, tiny_world):
    """--images: the first frame of prompt K is the K-th image of the folder, as validation.images[K]."""
    run = tiny_world(name, **FAMILY_RUN)
    config = load_config(run)
    precompute(config, progress=False)
    train(config, progress=False)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames/0.png").write_bytes((tmp_path / "first.png").read_bytes())
    (tmp_path / "prompts.txt").write_text("a red stripe pattern\n")
    arguments = ["sample", str(config.output.dir), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "0"]
    result = CliRunner().invoke(
        app, [*arguments, "--images", str(tmp_path / "frames"), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    validation = config.output.dir / "validation/step-000002/prompt-0.mp4"
    assert_same_clip(tmp_path / "s/prompt-0-seed-0.mp4", validation)
    record = json.loads((tmp_path / "s/samples.jsonl").read_text())
    assert Path(record["image"]).name == "0.png"


def run_without_validation_shape(lora_run: Path, root: Path, num_frames: int, size: tuple[int, int]) -> Path:
    """A copy of ``lora_run`` whose run file sets no validation frame count or size, and whose first
    training bucket is ``num_frames`` x ``size`` (the LoRA fits any clip shape)."""

    run_dir = shutil.copytree(lora_run, root / "run")
    document = json.loads((run_dir / "run_config.json").read_text())
    for key in ("num_frames", "height", "width"):
        del document["validation"][key]
    document["data"]["num_frames"] = [num_frames, 9]
    document["data"]["resolutions"] = [list(size), [32, 32]]
    (run_dir / "run_config.json").write_text(json.dumps(document))
    return run_dir


def test_sample_defaults_to_the_first_training_bucket(lora_run, tmp_path):
    """Not ValidationSection's 49 x 480 x 720 (CogVideoX-5B's shape, beyond the tiny Wan's rotary
    table): the clip has the shape of the run's first training bucket, data.num_frames[0] x
    data.resolutions[0]."""
    run_dir = run_without_validation_shape(lora_run, tmp_path, 5, (16, 48))
    config = read_run_config(run_dir)
    assert (config.validation.num_frames, config.validation.height, config.validation.width) == (5, 16, 48)
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    out = tmp_path / "samples"
    result = CliRunner().invoke(
        app,
        [
            "sample",
            str(run_dir),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert frames_of(out / "prompt-0-seed-0.gif").shape == (5, 16, 48, 3)
    assert json.loads((out / "samples.jsonl").read_text())["settings"]["num_frames"] == 5


# tiny Wan: rope_max_seq_len = 32 positions per axis; 8 (VAE) x 2 (patch) = 16 pixels per position
BEYOND_TABLE = "more than the transformer's rotary table holds (rope_max_seq_len = 32)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--height", "720"],
            f"--height: 720 needs 45 positions along that axis, {BEYOND_TABLE}; use at most 512",
        ),
        (
            ["--frames", "133"],
            f"--frames: 133 needs 34 positions along that axis, {BEYOND_TABLE}; use at most 125",
        ),
        (["--width", "44"], "--width: 44 is not a multiple of 16 (VAE stride x patch size); use 48"),
        (["--frames", "8"], "--frames: the model generates 1 + 4*m frames, not 8; use 9"),
    ],
)
def test_sample_refuses_a_shape_the_model_cannot_generate(lora_run, tmp_path, monkeypatch, args, message):
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    calls = []
    monkeypatch.setattr(crepa.sample, "generate_clips", lambda *a, **k: calls.append(a) or iter(()))
    command = [
        "sample",
        str(lora_run),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--out",
        str(tmp_path / "s"),
    ]
    result = CliRunner().invoke(app, [*command, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not calls and not (tmp_path / "s").exists()  # refused before sampling


def test_sample_names_the_run_file_key_of_a_default_it_cannot_generate(lora_run, tmp_path):
    run_dir = run_without_validation_shape(lora_run, tmp_path, 9, (32, 32))
    document = json.loads((run_dir / "run_config.json").read_text())
    document["validation"]["height"] = 992
    (run_dir / "run_config.json").write_text(json.dumps(document))
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    result = CliRunner().invoke(app, ["sample", str(run_dir), "--prompts", str(tmp_path / "prompts.txt")])
    assert result.exit_code == 2, result.output
    expected = f"--height (default: the run's validation.height): 992 needs 62 positions along that axis, {BEYOND_TABLE}"
    assert expected in " ".join(result.output.split()), result.output


def test_validation_shape_beyond_the_rotary_table_is_refused_before_training(tmp_path):
    run = write_world(tmp_path, "wan", clips=1)
    config = load_config(run, ["validation.every=1", "validation.width=720"])
    with pytest.raises(
        ConfigError, match=r"validation\.width: 720 needs 45 positions .*rope_max_seq_len = 32.*at most 512"
    ):
        train(config, progress=False)
    # unset, the validation shape is the first training bucket, which the model can generate
    text = run.read_text()
    run.write_text(text.replace("num_frames = 9\nheight = 32\nwidth = 32\n", ""))
    config = load_config(run, ["data.num_frames=[5, 9]", "data.resolutions=[[16, 48], [32, 32]]"])
    assert (config.validation.num_frames, config.validation.height, config.validation.width) == (5, 16, 48)
    settings = GenerationSettings.from_validation(config.validation)
    assert (settings.num_frames, settings.height, settings.width) == (5, 16, 48)
