"""``crepa demo`` end to end: world -> teacher and extractor -> base model -> the held-out clips
(real and through the VAE, measured) -> ``crepa experiment`` (precompute, 3 variants x seeds, sampling,
evaluation, report with verdict). Pre-trained artefacts are cached under the output folder and reused
while their settings are unchanged; the experiment skips what an earlier run finished."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from crepa.demo.artefacts import STAMP_FILE, build_once
from crepa.demo.base import PIPELINE_DIR, BaseSettings, build_base_model, build_initial_pipeline
from crepa.demo.evaluate import (
    SamplingSettings,
    evaluate_folder,
    load_pipeline,
    psnr,
    reconstruct_clips,
    world_entries,
    write_clips,
)
from crepa.demo.experiment import (
    DemoEvaluator,
    FinetuneSettings,
    precompute_heldout,
    run_sections,
    write_experiment_file,
)
from crepa.demo.extractor import ExtractorSettings, WorldReader, build_extractor
from crepa.demo.report import demo_extras
from crepa.demo.teacher import TeacherSettings, build_teacher
from crepa.demo.verdict import VARIANTS
from crepa.demo.world import PROBE, WORLD_VERSION, RenderedSplit, WorldSettings, write_world
from crepa.demo.world_section import LAYER_FIGURE, layer_figure, layer_profiles, world_blocks
from crepa.eval.evaluate import StageTimer
from crepa.eval.report import write_json, write_png
from crepa.experiment.report import ReportExtras, write_report
from crepa.experiment.runfiles import parse_variants
from crepa.experiment.runner import ExperimentResults, ExperimentSpec, run_experiment
from crepa.experiment.workers import quiet_libraries, torch_threads
from crepa.io.video import read_video_frames


@dataclass(frozen=True)
class DemoSettings:
    """Every size and step count of the demo; :meth:`quick` is the test-suite version."""

    seeds: int = 4
    world: WorldSettings = field(default_factory=WorldSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    extractor: ExtractorSettings = field(default_factory=ExtractorSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def with_world_seed(self, seed: int) -> DemoSettings:
        """The same settings on world ``seed``: the world and the initialisation and batches of the
        teacher, the extractor and the base model derive from it."""
        return replace(
            self,
            world=replace(self.world, seed=seed),
            teacher=replace(self.teacher, seed=seed),
            extractor=replace(self.extractor, seed=seed),
            base=replace(self.base, seed=seed),
        )

    @classmethod
    def quick(cls) -> DemoSettings:
        """Fewer clips, steps and seeds: the whole pipeline in about a minute."""
        return cls(
            seeds=2,
            world=WorldSettings(clips={"generic": 48, "attribute": 16, "heldout": 8, PROBE: 32}),
            teacher=TeacherSettings(steps=60),
            extractor=ExtractorSettings(steps=60, motion_steps=60),
            base=BaseSettings(steps=60),
            finetune=FinetuneSettings(steps=12, batch_size=4),
            sampling=SamplingSettings(inference_steps=8, samples_per_prompt=1),
        )


def stamp_digest(artefact: Path) -> str | None:
    """The settings digest a cached demo artefact was built with."""
    return json.loads((artefact / STAMP_FILE).read_text(encoding="utf-8")).get("digest")


def run_demo(
    out: Path, settings: DemoSettings, workers: int = 1, progress: bool = True
) -> tuple[ExperimentResults, ReportExtras]:
    """Run the whole demo into ``out``; returns what the report shows (also written to ``out``).

    ``workers`` processes (one torch thread each) run the fine-tuning runs and evaluations side by side;
    they import the calling script as spawned processes do, so a script calling this needs the
    ``if __name__ == "__main__"`` guard.
    """
    console = Console(stderr=True)
    quiet_libraries()
    out = out.resolve()
    timer = StageTimer()
    reused: dict[str, bool] = {}
    world_record = {"world": asdict(settings.world), "world_version": WORLD_VERSION}

    @contextmanager
    def stage(name: str, text: str, threads: int | None = None) -> Iterator[None]:
        """A timed stage; ``threads``: torch threads while it runs (the stages before the experiment
        have the machine to themselves, so they use as many threads as the experiment has workers)."""
        console.rule(f"[bold]{name}[/bold]: {text}")
        with timer.stage(name), torch_threads(threads or torch.get_num_threads()):
            yield

    with stage("world", "procedural clips with captions (mp4 + txt)"):
        world, reused["world"] = write_world(out / "world", settings.world, progress)
    models = out / "models"
    generic = RenderedSplit(settings.world, "generic")  # rendered only if an artefact must be built
    with stage("teacher", "tiny DINOv2, self-supervised on generic frames", workers):
        reused["teacher"] = build_teacher(
            models / "teacher", generic, settings.teacher, world_record, progress
        )
    with stage("extractor", "attribute and motion classifiers for the evaluation", workers):
        probe = RenderedSplit(settings.world, PROBE)
        reused["extractor"] = build_extractor(
            models / "extractor", probe, settings.extractor, world_record, progress
        )
    with stage(
        "base model", "PCA latent space + CogVideoX transformer pre-trained on the generic split", workers
    ):
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
    heldout_dir = world.split_dir("heldout")
    specs = world.specs["heldout"]
    captions = [spec.caption for spec in specs]
    prompts = tuple(captions * settings.sampling.samples_per_prompt)  # clip i + k * len(specs): draw k

    def sections(source: Path, cache: Path, output: Path):
        return run_sections(
            pipeline_dir,
            source,
            cache,
            teacher_dir,
            settings.world,
            settings.finetune,
            settings.sampling,
            output,
        )

    run_file = out / "experiment.toml"
    write_experiment_file(
        run_file, sections(world.split_dir("attribute"), out / "cache" / "attribute", out / "runs")
    )
    heldout_cache = out / "cache" / "heldout"
    with stage(
        "held-out clips", "latents and teacher grids; real clips and VAE reconstructions measured", workers
    ):
        summary = precompute_heldout(
            out / "heldout.toml", sections(heldout_dir, heldout_cache, out / "runs")
        )[1]
        computed = any(summary.computed.values())
        # The real clips and their VAE reconstructions, measured once per world, base model and extractor.
        record = {
            **world_record,
            **{name: stamp_digest(models / name) for name in ("base", "extractor")},
            "sampling": asdict(settings.sampling),
        }
        reconstruction = out / "reconstruction"

        def measure(staging: Path) -> None:
            reader = WorldReader.load(models / "extractor")
            extractor = reader.features()
            reconstructed = reconstruct_clips(load_pipeline(pipeline_dir), heldout_cache)
            clips = write_clips(staging / "clips", reconstructed, captions, settings.sampling.fps)
            real = np.stack([read_video_frames(heldout_dir / f"{spec.name}.mp4")[0] for spec in specs])
            measured = {
                "real": evaluate_folder(heldout_dir, staging / "eval-real", extractor, None)
                | world_entries(reader, real, specs),
                "reconstruction": evaluate_folder(clips, staging / "eval", extractor, heldout_dir)
                | world_entries(reader, reconstructed, specs)
                | {"psnr": {"value": psnr(real, reconstructed)}},
            }
            write_json(staging / "references.json", measured)

        reused["held-out clips"] = build_once(reconstruction, record, measure) and not computed
        references = json.loads((reconstruction / "references.json").read_text(encoding="utf-8"))
    spec = ExperimentSpec(
        run_file=run_file,
        out=out,
        variants=parse_variants(",".join(VARIANTS))[0],
        seeds=tuple(range(settings.seeds)),
        prompts=prompts,
        reference=heldout_dir,
        evaluator=DemoEvaluator(
            models / "extractor", heldout_dir, heldout_cache, settings.finetune.block_index, tuple(specs)
        ),
        workers=workers,
        sample_batch_size=len(prompts),
    )
    console.rule(
        f"[bold]experiment[/bold]: {len(VARIANTS)} variants x {settings.seeds} seeds, {workers} worker(s)"
    )
    results = run_experiment(spec, progress=progress, log=lambda text: console.rule(text, style="dim"))
    extras = demo_extras(
        asdict(settings),
        settings.seeds,
        world,
        references,
        reconstruction / "clips",
        dict(timer.seconds),
        reused,
    )
    extras = replace(
        extras, sections=[*world_blocks(results, references, settings.finetune.block_index), *extras.sections]
    )
    with stage("report", "report.md, report.html, GIF grid, curves"):
        write_png(out / LAYER_FIGURE, layer_figure(layer_profiles(results)))
        write_report(results, extras)
    results.stage_seconds["report"] = timer.seconds["report"]
    return results, extras
