"""``crepa experiment`` on a tiny Wan pipeline, 2 variants x 2 seeds: a run killed midway with SIGKILL
(a real subprocess) and rerun gives the same report as an uninterrupted run, and a rerun of a finished
experiment trains, samples and evaluates nothing. Runs trained as 2-process groups (accelerate launch)
match a direct launch. Plus the variant run files, option parsing and the GPU groups."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from crepa.cli import app
from crepa.cli.experiment import parse_margins, parse_seeds
from crepa.config import ConfigError, load_config
from crepa.experiment.launch import device_groups, launch_slots
from crepa.experiment.report import TIMING_HEADING, ReportExtras, curves_figure, timing_blocks
from crepa.experiment.runfiles import parse_variants, write_runs
from crepa.experiment.runner import (
    CrepaEvaluator,
    ExperimentResults,
    ExperimentSpec,
    analysis_plan,
    check_extractors_are_not_the_teacher,
)
from crepa.rundir import METRICS_FILE
from crepa.train.recipe import train
from helpers import assert_same_tensors, launch, start_cli, write_world

TIMING_KEYS = ("stage_seconds", "work", "machine")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiment-world")
    run = write_world(root, "wan")
    (root / "prompts.txt").write_text(
        "# held-out prompts\na red stripe pattern moves left\na blue stripe pattern\n"
    )
    return run


def experiment_args(world: Path, out: Path) -> list[str]:
    root = world.parent
    return [
        "experiment",
        str(world),
        "--variants",
        "none,crepa",
        "--seeds",
        "2",
        "--prompts",
        str(root / "prompts.txt"),
        "--reference",
        str(root / "clips"),
        "--metrics",
        "temporal_flickering,warping_error,flow_magnitude",
        "--no-base",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.checkpoint_every=1",
        "--sample-batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]


def report_without_timing(out: Path) -> tuple[str, dict]:
    markdown = (out / "report.md").read_text()
    content = json.loads((out / "report.json").read_text())
    return markdown.split(f"## {TIMING_HEADING}")[0], {
        k: v for k, v in content.items() if k not in TIMING_KEYS
    }


# ~30 s on 2 cores (an experiment, then a killed one in a subprocess, resumed): the slow suite
@pytest.mark.slow
def test_killed_experiment_resumes_to_the_same_report(world, tmp_path):
    runner = CliRunner()
    straight = tmp_path / "straight"
    result = runner.invoke(app, experiment_args(world, straight))
    assert result.exit_code == 0, result.output

    resumed = tmp_path / "resumed"
    process = start_cli(
        *experiment_args(world, resumed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = resumed / "runs" / "none-seed0" / "training_summary.json"
    deadline = time.monotonic() + 600
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # midway: the first run is done, the second is training
    assert process.wait() == -signal.SIGKILL
    # The analysis plan was declared in report.json before any result; the report itself is not written.
    declared = json.loads((resumed / "report.json").read_text())
    assert first.is_file() and not (resumed / "report.md").exists() and "comparisons" not in declared
    assert declared["plan"]["primary"] == ["temporal_flickering", "warping_error"]
    assert not (resumed / "runs" / "crepa-seed1" / "training_summary.json").exists()

    result = runner.invoke(app, experiment_args(world, resumed))
    assert result.exit_code == 0, result.output
    markdown, content = report_without_timing(resumed)
    assert (markdown, content) == report_without_timing(straight)
    work = json.loads((resumed / "report.json").read_text())["work"]
    assert work["none-seed0"]["trained"] is False and work["crepa-seed1"]["trained"] is True
    assert "| CREPA vs no alignment | warping error (↓) |" in markdown
    assert "## Verdict" in markdown and "no difference detectable with 2 seeds and 2 clips" in markdown
    for name in ("report.html", "curves.png", "samples.gif"):
        assert (resumed / name).stat().st_size > 0

    result = runner.invoke(app, experiment_args(world, resumed))  # finished: nothing is redone
    assert result.exit_code == 0, result.output
    work = json.loads((resumed / "report.json").read_text())["work"]
    assert not any(done for entry in work.values() for done in entry.values()), work
    assert report_without_timing(resumed) == report_without_timing(straight)

    # Every pair and metric carries raw and adjusted p, the correction, its margin, TOST and the
    # motion-adjusted comparison; the plan names the primary metrics.
    assert content["plan"] == declared["plan"] and content["plan"]["margins"]["warping_error"] == 0.0005
    for record in content["comparisons"]:
        assert record["correction"] == "holm" and record["family"] == "primary" and record["family_size"] == 2
        assert 0 <= record["p_value"] <= record["p_adjusted"] <= 1
        assert record["margin"] is not None and record["equivalence"]["outcome"] in (
            "within margin",
            "undecided",
        )
        assert record["motion_adjusted"]["correction"] == "holm"
    assert "2 headline questions were asked (1 pair x 2 primary metrics" in markdown
    # Another --primary in the same folder is another experiment: refused, the old report untouched.
    before = (resumed / "report.json").read_bytes()
    result = runner.invoke(app, [*experiment_args(world, resumed), "--primary", "warping_error"])
    assert result.exit_code == 2
    assert "a different --primary or --margin is a new experiment" in " ".join(result.output.split())
    assert (resumed / "report.json").read_bytes() == before


def test_a_rebuilt_base_model_is_never_paired_with_old_runs_or_samples(world, tmp_path):
    """The base model's folder changes between two invocations (rebuilt, same path): every run trains
    again from the start (its checkpoints belong to the old base) and the base model is sampled again."""
    base = tmp_path / "pipe"
    shutil.copytree(world.parent / "pipe", base)
    args = experiment_args(world, tmp_path / "out")
    args[args.index("--seeds") + 1] = "1"
    args[args.index("--no-base")] = "--base"
    args += ["--set", f'model.pretrained="{base}"']
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trainer options" not in result.output  # not once per run: the runs' files hold them
    result = runner.invoke(app, args)  # unchanged: nothing is redone
    work = json.loads((tmp_path / "out" / "report.json").read_text())["work"]
    assert not any(done for entry in work.values() for done in entry.values()), work

    loras = {
        name: load_file(str(tmp_path / "out" / "runs" / name / "pytorch_lora_weights.safetensors"))
        for name in ("none-seed0", "crepa-seed0")
    }
    weights = next((base / "transformer").glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({name: tensor * 1.5 for name, tensor in tensors.items()}, str(weights))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    work = json.loads((tmp_path / "out" / "report.json").read_text())["work"]
    assert work["none-seed0"]["trained"] and work["crepa-seed0"]["trained"], work
    assert work["base-seed0"]["sampled"] and work["base-seed0"]["evaluated"], work
    for name, before in loras.items():  # trained afresh, not resumed from the old base's last checkpoint
        after = load_file(str(tmp_path / "out" / "runs" / name / "pytorch_lora_weights.safetensors"))
        assert any(not torch.equal(after[key], before[key]) for key in before), name


def test_variant_run_files_differ_only_in_the_variant(world, tmp_path):
    variants, shared = parse_variants(
        "none,repa,crepa,crepa+repvideo,wide=crepa",
        ["train.max_steps=3", "wide.crepa.weight=2.0", "crepa.tau=0.5"],
    )
    assert [v.name for v in variants] == ["none", "repa", "crepa", "crepa+repvideo", "wide"]
    assert shared == ("train.max_steps=3", "crepa.tau=0.5")  # section.key applies to all
    runs = write_runs(world, variants, shared, (0, 5), tmp_path / "runs")
    assert [run.name for run, _ in runs][:2] == ["none-seed0", "none-seed5"]
    for run, config in runs:
        again = load_config(run.run_file)  # a complete run file on its own, paths absolute
        assert again == config and again.output.dir == run.directory and again.train.seed == run.seed
        assert again.cache.dir == (world.parent / "cache").resolve() and again.train.max_steps == 3
    by_variant = {run.variant: config.crepa for run, config in runs}
    assert [run.variant for run, config in runs if config.repvideo.enabled] == ["crepa+repvideo"] * 2
    assert not by_variant["none"].enabled
    assert by_variant["repa"].mode == "repa" and by_variant["repa"].distance == 0
    assert by_variant["crepa"].mode == "crepa" and by_variant["crepa"].distance == 1
    assert by_variant["crepa"].weight == 0.5 and by_variant["wide"].weight == 2.0
    assert by_variant["crepa"].tau == 0.5
    with pytest.raises(ConfigError, match="unknown variant 'crepaa'"):
        parse_variants("none,crepaa")
    with pytest.raises(ConfigError, match="two variants or more"):
        parse_variants("crepa")
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("0,4,7") == (0, 4, 7)
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("two")


def test_experiment_refuses_the_training_teacher_as_extractor(world, tmp_path):
    teacher = world.parent / "dino"
    args = experiment_args(world, tmp_path / "out")
    args[args.index("--metrics") + 1] = "subject_consistency"
    result = CliRunner().invoke(app, [*args, "--extractor", f"dinov2:{teacher}"])
    assert result.exit_code == 2
    assert "training teacher" in result.output
    hub_teacher = load_config(world, ['teacher.name="facebook/dinov2-base"'])
    with pytest.raises(ConfigError, match="frechet_distance=dinov2: that is the training teacher"):
        check_extractors_are_not_the_teacher(
            {"frechet_distance": "dinov2"}, hub_teacher
        )  # its default weights
    check_extractors_are_not_the_teacher(
        {"subject_consistency": "dino", "frechet_distance": "dinov2"}, load_config(world)
    )


def finished_results(work: dict[str, dict[str, bool]], out: Path = Path(".")) -> ExperimentResults:
    """Results of 2 runs and a base model at seed 0 (metrics not needed by the report parts tested)."""
    return ExperimentResults(
        variants=[{"name": "none", "label": "no alignment"}, {"name": "crepa", "label": "CREPA"}],
        seeds=[0],
        prompts=["a prompt"],
        metrics=[],
        rows={"base-seed0": {}, "none-seed0": {}, "crepa-seed0": {}},
        runs=["none-seed0", "crepa-seed0"],
        base=True,
        stage_seconds={"fine-tune": 1.0},
        work=work,
        machine={
            "cpus": 2,
            "torch_threads": 1,
            "workers": 1,
            "processes_per_run": 1,
            "load_average_before": [0, 0, 0],
            "load_average_after": [0, 0, 0],
        },
        out=out,
    )


def test_the_report_says_what_was_reused_only_when_something_was():
    done = {"trained": True, "sampled": True, "evaluated": True}
    fresh = {"none-seed0": done, "crepa-seed0": done, "base-seed0": {"sampled": True, "evaluated": True}}
    paragraphs = [
        block[1] for block in timing_blocks(finished_results(fresh), ReportExtras()) if block[0] == "p"
    ]
    assert (
        "This invocation trained 2 of 2 runs, sampled 3 and evaluated 3 of 3 models; nothing was reused from an "
        "earlier invocation." in paragraphs
    )
    resumed = {**fresh, "none-seed0": {"trained": False}}  # finished by the killed invocation
    paragraphs = [
        block[1] for block in timing_blocks(finished_results(resumed), ReportExtras()) if block[0] == "p"
    ]
    assert (
        "This invocation trained 1 of 2 runs, sampled 2 and evaluated 2 of 3 models; reused from an earlier "
        "invocation: the training of 1 run(s), the samples of 1 model(s), the evaluation of 1 model(s)."
        in paragraphs
    )


def test_curve_titles_fit_the_figure(tmp_path):
    """Rendered at the report's size with logged curves, every panel title lies inside the figure and
    clear of its neighbours' (a long one was cut at the figure's edge)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for run, aligned in (("none-seed0", False), ("crepa-seed0", True)):
        rows = [  # a run without alignment logs no alignment values
            {
                "step": step,
                "loss/diffusion": 0.5 / step,
                "crepa/sim_self": 0.001 * step if aligned else None,
                "crepa/score": 1.25 * step if aligned else None,
            }
            for step in range(1, 4)
        ]
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    figure = curves_figure(finished_results({}, tmp_path))
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    titles = [axis.title.get_window_extent(canvas.get_renderer()) for axis in figure.axes]
    assert len(titles) == 3 and all(title.width > 0 for title in titles)
    assert titles[0].x0 >= 0 and titles[-1].x1 <= figure.bbox.width
    assert all(left.x1 < right.x0 for left, right in itertools.pairwise(titles))


def test_gpus_are_split_into_groups_of_consecutive_devices(monkeypatch):
    gpus = [str(index) for index in range(8)]
    notes: list[str] = []
    assert device_groups(gpus, 2, notes.append) == ["0,1", "2,3", "4,5", "6,7"] and notes == []
    assert device_groups(gpus, 3, notes.append) == ["0,1,2", "3,4,5"]
    assert len(notes) == 1 and "GPU(s) 6,7 stay idle" in notes[0]
    assert device_groups(gpus, 8, notes.append) == [",".join(gpus)]
    with pytest.raises(ConfigError, match="--processes-per-run 9: only 8 GPU"):
        device_groups(gpus, 9)

    # CUDA_VISIBLE_DEVICES of this process is what the groups split
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    slots = launch_slots(2, workers=3, accelerate_config=None)
    assert slots == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch_slots(2, workers=3, accelerate_config=None) == [{}, {}, {}]  # CPU: --workers at once


def test_impossible_process_groups_are_refused_before_any_work(world, tmp_path, monkeypatch):
    args = experiment_args(world, tmp_path / "out")
    not_parallel = tmp_path / "single.yaml"
    not_parallel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n")
    result = CliRunner().invoke(
        app, [*args, "--processes-per-run", "2", "--accelerate-config", str(not_parallel)]
    )
    assert result.exit_code == 2
    assert "--accelerate-config" in result.output and "distributed_type is 'NO'" in result.output
    result = CliRunner().invoke(app, [*args, "--accelerate-config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "--accelerate-config" in result.output

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = CliRunner().invoke(app, [*args, "--processes-per-run", "4"])
    assert result.exit_code == 2
    assert "--processes-per-run 4: only 2 GPU(s) visible (0,1)" in result.output
    assert not (tmp_path / "out" / "runs" / "none-seed0" / "checkpoints").exists()  # nothing trained


@pytest.mark.slow
def test_runs_train_as_two_process_groups(world, tmp_path):
    out = tmp_path / "groups"
    args = experiment_args(world, out)
    args[args.index("--seeds") + 1] = "1"
    args += ["--processes-per-run", "2", "--workers", "2"]  # two launches at once
    # 4 clips: a batch of 4 per process does not fit 2 processes; the trainer's error reaches the user
    result = CliRunner().invoke(app, [*args, "--set", "train.batch_size=4"])
    assert result.exit_code == 1
    assert "-seed0: `crepa train` in 2 processes stopped (exit code" in result.output
    assert "train.batch_size: 4 x 2 process(es) is more than the largest bucket" in result.output

    args += ["--set", "train.batch_size=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("none-seed0", "crepa-seed0"):
        run_dir = out / "runs" / name
        summary = json.loads((run_dir / "training_summary.json").read_text())
        assert summary["processes"] == 2 and summary["parallelism"] == "ddp" and summary["steps"] == 2
        assert len(summary["rank_weight_checksums"]) == 2  # one per rank, equal: the ranks stayed in sync
        assert len(set(summary["rank_weight_checksums"])) == 1
        assert "--num_processes 2" in (run_dir / "launch.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["processes_per_run"] == 2 and (out / "report.md").stat().st_size > 0
    assert set(report["rows"]) == {"none-seed0", "crepa-seed0"}

    # A run stopped after its step-1 checkpoint resumes from it and ends where it ended.
    crepa_dir = out / "runs" / "crepa-seed0"
    finished = load_file(crepa_dir / "pytorch_lora_weights.safetensors")
    shutil.rmtree(crepa_dir / "checkpoints" / "step-000002")
    (crepa_dir / "training_summary.json").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resumed from" in (crepa_dir / "launch.log").read_text()
    resumed = load_file(crepa_dir / "pytorch_lora_weights.safetensors")
    assert finished.keys() == resumed.keys() and all(torch.equal(finished[k], resumed[k]) for k in finished)
    work = json.loads((out / "report.json").read_text())["work"]
    assert work["crepa-seed0"]["trained"] and not work["none-seed0"]["trained"]

    # Reference: the same run file launched by hand, 2 gloo processes (test_scale's recipe).
    run_file = out / "runs" / "crepa-seed0" / "run.toml"
    launch(run_file, f'output.dir="{tmp_path / "direct"}"')
    for name in ("pytorch_lora_weights.safetensors", "projector.safetensors"):
        assert_same_tensors(out / "runs" / "crepa-seed0" / name, tmp_path / "direct" / name, atol=1e-6)

    # In one process with the same global batch (2) the LoRA cannot be equal: the trainer deals batches
    # of train.batch_size round-robin to the ranks (other sample pairs than one batch of 2) and seeds each
    # rank's noise and timesteps with its rank. What holds: the same initial LoRA (the run's seed) and
    # two AdamW steps at optim.lr, each moving a weight by at most lr (1.0015 lr at step 2, betas
    # 0.9 / 0.999) plus lr * weight_decay * |w|: the two LoRAs are within 2 x 2 steps of each other.
    single = load_config(run_file, ["train.batch_size=2", f'output.dir="{tmp_path / "single"}"'])
    train(single, progress=False)
    launched = load_file(out / "runs" / "crepa-seed0" / "pytorch_lora_weights.safetensors")
    alone = load_file(tmp_path / "single" / "pytorch_lora_weights.safetensors")
    lr, decay = single.optim.lr, single.optim.weight_decay
    assert launched.keys() == alone.keys()
    for key, tensor in launched.items():
        bound = 2 * 2 * lr * (1.0015 + decay * float(tensor.abs().max()))
        assert float((tensor - alone[key]).abs().max()) <= bound, key
    assert any(not torch.equal(tensor, alone[key]) for key, tensor in launched.items())


def test_the_plan_comes_from_the_run_file_and_the_command_line(world, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(
        world.read_text() + '\n[experiment]\nprimary = ["warping_error"]\nmargins = {warping_error = 0.001}\n'
    )
    spec = ExperimentSpec(
        run_file=run_file,
        out=tmp_path / "out",
        variants=parse_variants("none,crepa")[0],
        seeds=(0, 1),
        prompts=("a prompt",),
        reference=None,
        evaluator=CrepaEvaluator(metrics_requested=("temporal_flickering", "warping_error")),
    )
    plan = analysis_plan(spec)
    assert plan.primary == ("warping_error",)
    assert plan.margins == {"temporal_flickering": 0.002, "warping_error": 0.001}
    plan = analysis_plan(
        replace(spec, primary=("temporal_flickering",), margins={"temporal_flickering": 0.01})
    )
    assert plan.primary == ("temporal_flickering",) and plan.margins["temporal_flickering"] == 0.01
    with pytest.raises(ConfigError, match="--primary frechet_distance: not a judged metric"):
        analysis_plan(replace(spec, primary=("frechet_distance",)))
    # The plan is the experiment's, not a run's: the variants' run files leave it out.
    runs = write_runs(run_file, parse_variants("none,crepa")[0], (), (0,), tmp_path / "runs")
    assert all("[experiment]" not in run.run_file.read_text() for run, _ in runs)
    assert parse_margins(["warping_error=0.001", "subject_consistency=2e-3"]) == {
        "warping_error": 0.001,
        "subject_consistency": 0.002,
    }
    with pytest.raises(ConfigError, match="--margin: expected METRIC=VALUE"):
        parse_margins(["warping_error"])
