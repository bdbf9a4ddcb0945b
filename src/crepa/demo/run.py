"""``crepa demo`` end to end: world -> teacher and extractor -> base model -> precompute ->
fine-tuning (3 variants x seeds) -> sampling and evaluation -> report. Pre-trained artefacts are
cached under the output folder and reused while their settings are unchanged."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from crepa.demo.base import PIPELINE_DIR, BaseSettings, build_base_model, build_initial_pipeline
from crepa.demo.evaluate import (
    EvalJob,
    SamplingSettings,
    evaluate_folder,
    load_pipeline,
    reconstruct_clips,
    run_eval_job,
    write_clips,
)
from crepa.demo.experiment import VARIANTS, FinetuneSettings, Run, precompute_heldout, prepare_runs, train_run
from crepa.demo.extractor import ExtractorSettings, build_extractor, load_attribute_extractor
from crepa.demo.report import DemoResults, write_report
from crepa.demo.teacher import TeacherSettings, build_teacher
from crepa.demo.workers import quiet_libraries, run_jobs, worker_pool
from crepa.demo.world import WORLD_VERSION, RenderedSplit, World, WorldSettings, write_world
from crepa.eval.evaluate import StageTimer
from crepa.precompute import precompute


@dataclass(frozen=True)
class DemoSettings:
    """Every size and step count of the demo; :meth:`quick` is the test-suite version."""

    seeds: int = 3
    world: WorldSettings = field(default_factory=WorldSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    extractor: ExtractorSettings = field(default_factory=ExtractorSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    @classmethod
    def quick(cls) -> DemoSettings:
        """Fewer clips, steps and seeds: the whole pipeline in about a minute."""
        return cls(
            seeds=2,
            world=WorldSettings(clips={"generic": 48, "attribute": 16, "heldout": 8}),
            teacher=TeacherSettings(steps=60),
            extractor=ExtractorSettings(steps=60),
            base=BaseSettings(steps=60),
            finetune=FinetuneSettings(steps=12, batch_size=4),
            sampling=SamplingSettings(inference_steps=8),
        )


def run_demo(out: Path, settings: DemoSettings, workers: int = 1, progress: bool = True) -> DemoResults:
    """Run the whole demo into ``out``; returns what the report shows (also written to ``out``).

    ``workers`` processes (one torch thread each) run the fine-tuning runs and evaluations side by side;
    they are started with ``spawn``, so a script calling this needs the ``if __name__ == "__main__"`` guard.
    """
    console = Console(stderr=True)
    quiet_libraries()
    out = out.resolve()
    timer = StageTimer()
    reused: dict[str, bool] = {}
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    world_record = {"world": asdict(settings.world), "world_version": WORLD_VERSION}

    def stage(name: str, text: str):
        console.rule(f"[bold]{name}[/bold]: {text}")
        return timer.stage(name)

    with stage("world", "procedural clips with captions (mp4 + txt)"):
        world, reused["world"] = write_world(out / "world", settings.world, progress)
    models = out / "models"
    generic = RenderedSplit(settings.world, "generic")  # rendered only if an artefact must be built
    with stage("teacher", "tiny DINOv2, self-supervised on generic frames"):
        reused["teacher"] = build_teacher(
            models / "teacher", generic, settings.teacher, world_record, progress
        )
    with stage("extractor", "attribute classifier for the evaluation"):
        reused["extractor"] = build_extractor(
            models / "extractor", generic, settings.extractor, world_record, progress
        )
    with stage("base model", "PCA latent space + CogVideoX transformer pre-trained on the generic split"):
        initial = models / "initial-pipeline"
        build_initial_pipeline(initial, generic, settings.base, world_record)
        reused["base model"] = build_base_model(
            models / "base",
            initial,
            world.split_dir("generic"),
            out / "cache" / "generic",
            settings.world,
            settings.base,
            {**world_record, "base": asdict(settings.base)},
            progress,
        )
    pipeline_dir = models / "base" / PIPELINE_DIR
    teacher_dir = models / "teacher"

    runs_root = out / "runs"
    runs = prepare_runs(
        runs_root,
        pipeline_dir,
        world.split_dir("attribute"),
        out / "cache" / "attribute",
        teacher_dir,
        settings.world,
        settings.finetune,
        settings.seeds,
    )
    with stage("precompute", "latents, captions and teacher grids of the attribute and held-out clips"):
        crepa_config = next(config for run, config in runs if run.variant == "crepa")
        summaries = [precompute(crepa_config, progress=progress)]  # the superset every variant reads
        heldout_cache = out / "cache" / "heldout"
        summaries.append(
            precompute_heldout(
                runs_root,
                pipeline_dir,
                world.split_dir("heldout"),
                heldout_cache,
                teacher_dir,
                settings.world,
            )[1]
        )
        reused["precompute"] = not any(count for summary in summaries for count in summary.computed.values())
    with worker_pool(workers, threads) as pool:
        with stage(
            "fine-tune", f"{len(VARIANTS)} variants x {settings.seeds} seeds, LoRA, {workers} worker(s)"
        ):
            run_jobs(pool, train_run, [config_run.run_file for config_run, _ in runs], "fine-tune", progress)
        with stage("sample + eval", "held-out prompts, crepa eval metrics, CKNNA"):
            evaluation = evaluate_everything(
                out, world, [run for run, _ in runs], pipeline_dir, heldout_cache, settings, pool, progress
            )

    results = DemoResults(
        settings=asdict(settings),
        runs=[run.name for run, _ in runs],
        seeds=settings.seeds,
        metrics=evaluation,
        reused=reused,
        stage_seconds=dict(timer.seconds),
        machine={
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "workers": workers,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
    )
    with stage("report", "report.md, report.html, GIF grid, curves"):
        write_report(out, results, world, runs_root)
    results.stage_seconds["report"] = timer.seconds["report"]
    return results


def evaluate_everything(
    out: Path,
    world: World,
    runs: list[Run],
    pipeline_dir: Path,
    heldout_cache: Path,
    settings: DemoSettings,
    pool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Metrics by row name: each run, the base model per seed, the real held-out clips and their VAE
    reconstructions. Sample clips go to ``out/samples/<row>``, ``crepa eval`` reports to ``out/eval/<row>``."""
    heldout_dir = world.split_dir("heldout")
    prompts = tuple(spec.caption for spec in world.specs["heldout"])
    samples_root, eval_root = out / "samples", out / "eval"
    shutil.rmtree(samples_root, ignore_errors=True)
    shutil.rmtree(eval_root, ignore_errors=True)
    extractor_dir = out / "models" / "extractor"
    extractor = load_attribute_extractor(extractor_dir)
    reconstruction = write_clips(
        samples_root / "reconstruction",
        reconstruct_clips(load_pipeline(pipeline_dir), heldout_cache),
        list(prompts),
        settings.sampling.fps,
    )
    metrics: dict[str, dict[str, Any]] = {
        "real": evaluate_folder(heldout_dir, eval_root / "real", extractor, None),
        "reconstruction": evaluate_folder(
            reconstruction, eval_root / "reconstruction", extractor, heldout_dir
        ),
    }
    models = [(f"base-seed{seed}", None, seed) for seed in range(settings.seeds)]
    models += [(run.name, run.directory, run.seed) for run in runs]
    jobs = [
        EvalJob(
            name=name,
            pipeline_dir=pipeline_dir,
            lora_dir=lora_dir,
            seed=seed,
            prompts=prompts,
            size=world.settings.size,
            num_frames=world.settings.num_frames,
            sampling=settings.sampling,
            block_index=settings.finetune.block_index,
            extractor_dir=extractor_dir,
            heldout_dir=heldout_dir,
            heldout_cache=heldout_cache,
            samples_dir=samples_root / name,
            eval_dir=eval_root / name,
        )
        for name, lora_dir, seed in models
    ]
    metrics.update(run_jobs(pool, run_eval_job, jobs, "sample + eval", progress))
    return metrics
