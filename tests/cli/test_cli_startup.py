"""`crepa --help` answers at once: neither the CLI nor a command's --help imports torch, diffusers,
transformers, peft or accelerate (each command imports what it needs when it runs), and what the
CLI used to import up front for every command (the demo's VAE module) is still there when one runs."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from crepa.cli import app

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")
# Runs `python -m crepa ARGS` in this process (runpy), then writes the exit code and the heavy
# libraries it imported to the file named by argv[2].
PROBE = f"""
import json, runpy, sys
args, report = json.loads(sys.argv[1]), sys.argv[2]
sys.argv = ["crepa", *args]
try:
    runpy.run_module("crepa", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as end:
    code = end.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
with open(report, "w") as file:
    json.dump({{"code": code, "heavy": heavy}}, file)
"""
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def probe(args: list[str], tmp_path) -> tuple[dict, str]:
    """(exit code and heavy libraries imported, stdout) of ``python -m crepa ARGS`` in a real process."""
    report = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), done.stderr
    return json.loads(report.read_text()), done.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS], ids=lambda c: c or "crepa")
def test_help_imports_no_heavy_library(command, tmp_path):
    result, out = probe([command, "--help"] if command else ["--help"], tmp_path)
    assert result == {"code": 0, "heavy": []}
    assert "Usage:" in out and (command or "Commands") in out


def test_probe_sees_a_command_that_imports_torch(tmp_path):
    """The check above can fail: `crepa families` (the support table) does import torch and diffusers."""
    result, out = probe(["families", "--markdown"], tmp_path)
    assert result["code"] == 0 and {"torch", "diffusers"} <= set(result["heavy"])
    assert out.startswith("| family | variant |")


class Recorder(logging.Handler):
    """The messages a logger passes on (those its filters keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_pipeline_with_the_demo_vae_loads_in_a_command(tiny_world, run_cli):
    """diffusers finds a component of another library in sys.modules only: `crepa precompute` on a
    pipeline whose VAE is the demo's (crepa.demo.latent) imports that module before loading. Neither
    it nor `crepa sample`'s pipeline (crepa.generation.load_pipeline) prints diffusers' "Expected types
    for vae" about that VAE; nor does precompute log its choice of video decoder."""
    from diffusers import CogVideoXTransformer3DModel

    from crepa.config import ModelSection
    from crepa.demo.latent import PCAVideoAutoencoder
    from crepa.generation import load_pipeline
    from crepa.models.pipelines import own_components_accepted
    from crepa.models.registry import get_family

    run = tiny_world("cogvideox")
    pipe = run.parent / "pipe"
    channels = json.loads((pipe / "vae" / "config.json").read_text())["latent_channels"]
    shutil.rmtree(pipe / "vae")
    PCAVideoAutoencoder(latent_channels=channels).save_pretrained(pipe / "vae")
    index = json.loads((pipe / "model_index.json").read_text())
    index["vae"] = ["crepa.demo.latent", "PCAVideoAutoencoder"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    done = run_cli("precompute", str(run), "--no-progress", cwd=run.parent)
    assert done.returncode == 0, done.stderr
    assert "4 used, 0 skipped" in done.stderr
    assert "Expected types" not in done.stderr and "video decoding" not in done.stderr

    recorder, pipeline_logger = Recorder(), logging.getLogger("diffusers.pipelines.pipeline_utils")
    pipeline_logger.addHandler(recorder)
    try:
        transformer = CogVideoXTransformer3DModel.from_pretrained(pipe / "transformer")
        pipeline = load_pipeline(ModelSection(pretrained=str(pipe)), get_family("cogvideox"), transformer)
        assert isinstance(pipeline.vae, PCAVideoAutoencoder)
        other = "Expected types for vae: (<class 'A'>,), got <class 'torch.nn.modules.linear.Linear'>."
        with own_components_accepted():  # a mismatch of another library's class is still told
            pipeline_logger.warning(other)
    finally:
        pipeline_logger.removeHandler(recorder)
    assert recorder.messages == [other]


def test_the_demo_imports_and_builds_its_pipelines_without_a_transformers_notice():
    """`crepa demo` imports the tiny pipelines (crepa.demo.run); without torchvision, transformers told
    there that CLIPImageProcessor falls back to its PIL class. Building the tiny pipeline that holds
    that processor (Wan I2V) is quiet too."""
    code = "import crepa.demo.run\nfrom crepa.models.tiny_pipelines import TINY_PIPELINES\nTINY_PIPELINES['wan_i2v']()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CLIPImageProcessor" not in done.stderr


def test_version_prints_the_installed_version_without_heavy_imports(tmp_path):
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    release = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    result, out = probe(["--version"], tmp_path)
    assert result == {"code": 0, "heavy": []}
    assert out.strip() == f"crepa {release}"


def test_every_option_has_help_and_progress_is_a_pair():
    """Each option and argument says what it does in --help; a progress bar is switched the same way
    (--progress/--no-progress) in every command that has one."""
    commands = typer.main.get_command(app).commands
    undocumented = [(name, p.name) for name, c in commands.items() for p in c.params if not p.help]
    assert undocumented == []
    progress = {
        name: (*p.opts, *p.secondary_opts)
        for name, c in commands.items()
        for p in c.params
        if "progress" in p.name
    }
    assert {"train", "sample", "eval", "precompute"} <= set(progress)
    assert set(progress.values()) == {("--progress", "--no-progress")}
