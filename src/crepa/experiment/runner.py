"""``crepa experiment`` as a function: variants x seeds of one run file, trained on one shared
precompute cache, sampled with the same prompts and seeds, evaluated alike, then reported.

Folder layout under ``out``::

    runs/<variant>-seed<k>/      run.toml + what `crepa train` writes (training_summary.json last)
    samples/<model>/             the clips of each run and of the base model (samples.jsonl last)
    eval/<model>/                the evaluation (experiment_metrics.json last)
    report.md, report.html, report.json, curves.png, samples.gif

Resumable: every stage decides "finished" from the file written atomically last, and checks that it
belongs to the current inputs (a run's summary holds its whole config; a samples manifest the prompts,
seed, settings and the trained weights' checksum; an evaluation the manifest's digest and the
evaluator's settings; runs and samples also the base model's files, so a rebuilt base model is never
paired with LoRAs or clips made from the old one). A rerun skips what is finished and redoes the rest: an interrupted training
run resumes from its last checkpoint (or restarts when it has none).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crepa.cache.atomic import atomic_write_json
from crepa.config import ConfigError, RunConfig, load_config
from crepa.eval.evaluate import (
    BETTER,
    DEFAULT_EXTRACTORS,
    StageTimer,
    evaluate_clips,
    extractor_specs,
    load_extractors,
    resolve_metrics,
)
from crepa.eval.extractors import DEFAULT_SOURCES, check_extractor
from crepa.eval.report import write_eval_report
from crepa.eval.videos import find_clips
from crepa.experiment.launch import launch_runs, launch_slots
from crepa.experiment.lifecycle import pretrained_stamp, train_run, training_finished
from crepa.experiment.runfiles import Run, Variant, write_runs
from crepa.experiment.verdict import AnalysisPlan, MetricSpec, resolve_plan
from crepa.experiment.workers import quiet_libraries, run_jobs, worker_pool
from crepa.generation import (
    SAMPLES_FILE,
    ClipRequest,
    GenerationSettings,
    generate_clips,
    load_pipeline,
    write_clips,
)
from crepa.models.hub import check_loadable
from crepa.models.loading import load_transformer, resolve_family
from crepa.precompute import precompute, uses_cached_teacher
from crepa.rundir import SUMMARY_FILE
from crepa.sample import load_run_pipeline, read_prompts

EVAL_FILE = "experiment_metrics.json"
REPORT_FILE = "report.json"
PLAN_KEYS = ("primary", "margins", "alpha")  # what makes a plan another experiment
# Evaluations keep every clip's values (for the motion-adjusted verdict); older ones are redone.
PER_CLIP_VALUES = "summary and per clip"
LOSSLESS_CRF = 0  # the metrics then see exactly the sampled frames, the same in every run
SEED_STRIDE = 100_003  # prime: the noise seeds of different (seed, prompt) pairs never coincide in practice


def clip_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index`` in the models of ``seed``: distinct per prompt (clips of one
    model are independent draws), equal across variants (the pairing); ``crepa sample --seeds`` with it
    reproduces the clip."""
    return seed * SEED_STRIDE + index


def clip_file(seed: int, index: int) -> str:
    return f"prompt-{index}-seed-{clip_seed(seed, index)}.mp4"


# ---------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class ModelJob:
    """Sample and evaluate one model: a finished run (``run_dir``) or the base model (None)."""

    name: str
    run_file: Path
    run_dir: Path | None
    seed: int
    prompts: tuple[str, ...]
    batch_size: int
    samples_dir: Path
    eval_dir: Path
    reference: Path | None
    evaluator: Evaluator


class Evaluator(Protocol):
    """Measures the clips of one model. Must be picklable (a frozen dataclass of a module's top level)
    when the experiment runs on several worker processes."""

    def metrics(self, with_reference: bool) -> tuple[MetricSpec, ...]:
        """The measures it returns, in table order, and which direction is better."""
        ...

    def describe(self) -> dict[str, Any]:
        """Its settings: an evaluation made with other settings is redone."""
        ...

    def __call__(self, job: ModelJob, model: LoadedModel) -> dict[str, dict[str, Any]]:
        """``{metric: {"value": number, ...}}`` for the clips in ``job.samples_dir``; may write files
        into ``job.eval_dir``; ``model.pipeline()`` gives the sampled model (loaded on first use)."""
        ...


class LoadedModel:
    """The model of a job, loaded at most once: for sampling, and for evaluators that measure the model
    itself (e.g. its hidden states) rather than its clips."""

    def __init__(self, job: ModelJob) -> None:
        self.job = job
        self.config = load_config(job.run_file)
        self._loaded: tuple[Any, Any] | None = None

    def pipeline(self):
        return self.loaded()[0]

    def loaded(self) -> tuple[Any, Any]:
        """(pipeline, family), loading them on first use."""
        if self._loaded is None:
            self._loaded = load_model_pipeline(self.job, self.config)
        return self._loaded


def metric_spec(key: str) -> MetricSpec:
    """A ``crepa eval`` metric as a table column / verdict entry."""
    better = BETTER.get(key)
    return MetricSpec(key, key.replace("_", " "), None if better is None else better == "higher")


@dataclass(frozen=True)
class CrepaEvaluator:
    """``crepa eval SAMPLES --reference REFERENCE``: consistency, motion and, with a reference, the
    Frechet distance. ``metrics`` None means crepa eval's defaults; ``extractors`` are ``--extractor``
    values (SPEC or METRIC=SPEC)."""

    metrics_requested: tuple[str, ...] | None = None
    extractors: tuple[str, ...] = ()
    flow: str = "dis"
    device: str = "auto"
    batch_size: int = 32

    def chosen(self, with_reference: bool) -> tuple[str, ...]:
        return resolve_metrics(
            list(self.metrics_requested) if self.metrics_requested else None, with_reference
        )

    def metrics(self, with_reference: bool) -> tuple[MetricSpec, ...]:
        return tuple(metric_spec(key) for key in self.chosen(with_reference))

    def extractor_specs(self, with_reference: bool) -> dict[str, str]:
        return extractor_specs(list(self.extractors), self.chosen(with_reference))

    def describe(self) -> dict[str, Any]:
        return {"evaluator": "crepa eval", "values": PER_CLIP_VALUES, **asdict(self)}

    def __call__(self, job: ModelJob, model: LoadedModel) -> dict[str, dict[str, Any]]:
        with_reference = job.reference is not None
        chosen = self.chosen(with_reference)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        extractors = load_extractors(self.extractor_specs(with_reference), device, self.batch_size)
        reference = find_clips(job.reference) if job.reference is not None else []
        result = evaluate_clips(
            find_clips(job.samples_dir / SAMPLES_FILE),
            chosen,
            extractors,
            reference=reference,
            flow_method=self.flow,  # type: ignore[arg-type]
            progress=False,
        )
        report = write_eval_report(
            job.eval_dir, result, videos_dir=job.samples_dir, reference_dir=job.reference
        )
        return report["metrics"]


def check_extractors_are_not_the_teacher(specs: dict[str, str], config: RunConfig) -> None:
    """The training teacher measures what the runs were trained to match: refuse it as an extractor."""
    teacher = str(config.teacher.name)
    for metric, spec in specs.items():
        kind, _, source = spec.partition(":")
        source = source or DEFAULT_SOURCES.get(kind) or spec
        if source in (teacher, os.path.abspath(teacher)):
            raise ConfigError(
                f"--extractor {metric}={spec}: that is the training teacher ({teacher}); the aligned variants "
                "were trained to match its features, so it would favour them. Use another extractor (defaults: "
                + ", ".join(f"{m}={s}" for m, s in DEFAULT_EXTRACTORS.items())
                + ")"
            )


def weights_stamp(job: ModelJob, config: RunConfig) -> str:
    """What identifies a model's weights: the base model's stamp, plus the run's trained-weight checksums."""
    base = pretrained_stamp(config)
    if job.run_dir is None:
        return f"base:{base}"
    summary = json.loads((job.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return f"{base}:{summary['steps']}:{summary['rank_weight_checksums']}"


def samples_current(job: ModelJob, settings: GenerationSettings, stamp: str) -> bool:
    """Whether ``job.samples_dir/samples.jsonl`` holds exactly the clips this job would write."""
    path = job.samples_dir / SAMPLES_FILE
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return False
    expected = [
        (prompt, clip_seed(job.seed, i), asdict(settings), stamp) for i, prompt in enumerate(job.prompts)
    ]
    found = [(r.get("prompt"), r.get("seed"), r.get("settings"), r.get("weights")) for r in records]
    return found == expected and all((job.samples_dir / r["file"]).is_file() for r in records)


def load_model_pipeline(job: ModelJob, config: RunConfig):
    """The family's pipeline with the run's trained weights (LoRA, RepVideo gates), or the base model."""
    if job.run_dir is not None:
        run = load_run_pipeline(job.run_dir)
        return run.pipeline, run.family
    family = resolve_family(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer = load_transformer(config, family, config.model.torch_dtype(device)).requires_grad_(False)
    return load_pipeline(config.model, family, transformer.eval(), device=device), family


def evaluation_stamp(job: ModelJob) -> dict[str, Any]:
    """What an evaluation must match to be reused: the manifest's digest and the evaluator's settings,
    as JSON reads them back (paths as strings, tuples as lists)."""
    manifest = hashlib.sha256((job.samples_dir / SAMPLES_FILE).read_bytes()).hexdigest()
    return json.loads(
        json.dumps({"samples_sha256": manifest, "evaluator": job.evaluator.describe()}, default=str)
    )


def current_evaluation(job: ModelJob, stamp: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The metrics of ``job.eval_dir`` when they were computed with ``stamp``, else None."""
    try:
        previous = json.loads((job.eval_dir / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return previous["metrics"] if {key: previous.get(key) for key in stamp} == stamp else None


def finished_metrics(job: ModelJob) -> dict[str, dict[str, Any]] | None:
    """The job's metrics when its samples and their evaluation are current (reads a few files only,
    so the experiment checks this before starting any worker)."""
    config = load_config(job.run_file)
    settings = GenerationSettings.from_validation(config.validation)
    if not samples_current(job, settings, weights_stamp(job, config)):
        return None
    return current_evaluation(job, evaluation_stamp(job))


def sample_and_evaluate(job: ModelJob) -> tuple[str, dict[str, dict[str, Any]], dict[str, bool]]:
    """Sample the job's model (unless its samples are current), evaluate them (unless that evaluation
    is current); returns (name, metrics, {"sampled": ..., "evaluated": ...}). A top-level function, so
    worker processes can run it."""
    model = LoadedModel(job)
    settings = GenerationSettings.from_validation(model.config.validation)
    stamp = weights_stamp(job, model.config)
    done = {"sampled": False, "evaluated": False}
    if not samples_current(job, settings, stamp):
        shutil.rmtree(job.samples_dir, ignore_errors=True)
        pipeline, family = model.loaded()
        requests = [ClipRequest(prompt, clip_seed(job.seed, i)) for i, prompt in enumerate(job.prompts)]
        clips = generate_clips(pipeline, family, requests, settings, batch_size=job.batch_size)
        stems = (Path(clip_file(job.seed, index)).stem for index in range(len(requests)))
        extra = {"model": job.name, "weights": stamp}
        write_clips(job.samples_dir, zip(stems, clips, strict=True), settings, extra=extra, crf=LOSSLESS_CRF)
        done["sampled"] = True
    record = evaluation_stamp(job)
    metrics = current_evaluation(job, record)
    if metrics is None:
        shutil.rmtree(job.eval_dir, ignore_errors=True)
        metrics = job.evaluator(job, model)
        atomic_write_json(job.eval_dir / EVAL_FILE, {**record, "metrics": metrics})
        done["evaluated"] = True
    return job.name, metrics, done


# ---------------------------------------------------------------- the experiment
@dataclass(frozen=True)
class ExperimentSpec:
    """Everything ``crepa experiment`` needs.

    Sampling uses the run file's ``[validation]`` settings. base: also sample and evaluate the base model at
    every seed (a table row; not part of the verdict). workers: processes for the runs and the
    evaluations (1: everything in this process, one run after the other). processes_per_run > 1 or an
    accelerate_config: each run is trained by ``accelerate launch`` in that many processes, on a GPU
    group of its own (:mod:`crepa.experiment.launch`). primary / margins: the verdict's primary metrics
    and equivalence margins (None / missing keys: the run file's ``[experiment]`` section, then the
    defaults of :func:`crepa.experiment.verdict.resolve_plan`)."""

    run_file: Path
    out: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    reference: Path | None
    evaluator: Evaluator = field(default_factory=CrepaEvaluator)
    shared_overrides: tuple[str, ...] = ()
    base: bool = True
    workers: int = 1
    sample_batch_size: int = 1
    processes_per_run: int = 1
    accelerate_config: Path | None = None
    primary: tuple[str, ...] | None = None
    margins: Mapping[str, float] = field(default_factory=dict)

    @property
    def launched(self) -> bool:
        """Whether runs train in launched process groups rather than in the worker processes."""
        return self.processes_per_run > 1 or self.accelerate_config is not None


@dataclass
class ExperimentResults:
    """What the report shows: the design, every evaluated model's metrics (rows ``<variant>-seed<k>``
    and ``base-seed<k>``), what each stage did and how long it took."""

    variants: list[dict[str, str]]  # name, label
    seeds: list[int]
    prompts: list[str]
    metrics: list[MetricSpec]
    rows: dict[str, dict[str, Any]]
    runs: list[str]
    base: bool
    stage_seconds: dict[str, float]
    work: dict[str, dict[str, bool]]  # model -> {"trained", "sampled", "evaluated"}
    machine: dict[str, Any]
    out: Path
    plan: AnalysisPlan | None = None  # None: the default plan for ``metrics``

    @property
    def clips(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> dict[str, str]:
        return {v["name"]: v["label"] for v in self.variants}


def superset_config(configs: Sequence[RunConfig]) -> RunConfig:
    """The config whose precompute fills the cache for every variant: one that reads teacher grids."""
    return next((config for config in configs if uses_cached_teacher(config)), configs[0])


def prepare(spec: ExperimentSpec) -> list[tuple[Run, RunConfig]]:
    """Check the inputs, and that every model loaded after training (the eval extractors, the sampling
    pipeline) is reachable or cached; write the run files (nothing is trained yet)."""
    if not spec.prompts:
        raise ConfigError("--prompts: no prompts (one per line)")
    if spec.reference is not None and not find_clips(spec.reference):
        raise ConfigError(
            f"--reference {spec.reference}: no clips found (mp4, gif, webm, ... or frame folders)"
        )
    runs = write_runs(spec.run_file, spec.variants, spec.shared_overrides, spec.seeds, spec.out / "runs")
    caches = {config.cache.dir for _, config in runs}
    if len(caches) > 1:
        raise ConfigError(
            "cache.dir differs between variants; the variants must share one precompute cache (do not --set "
            "cache.dir per variant)"
        )
    if isinstance(spec.evaluator, CrepaEvaluator):
        specs = spec.evaluator.extractor_specs(spec.reference is not None)
        check_extractors_are_not_the_teacher(specs, runs[0][1])
        for extractor in dict.fromkeys(specs.values()):
            check_extractor(extractor)
    # Sampling loads the whole pipeline, after training: a model the hub cannot serve stops us now.
    for pretrained, revision in dict.fromkeys((c.model.pretrained, c.model.revision) for _, c in runs):
        check_loadable(pretrained, "model.pretrained", "model_index.json", revision)
    return runs


def analysis_plan(spec: ExperimentSpec) -> AnalysisPlan:
    """The verdict's plan: ``spec.primary`` / ``spec.margins`` over the run file's ``[experiment]``
    section, over the defaults; a bad metric name or margin is a ConfigError."""
    section = load_config(spec.run_file).experiment
    primary = spec.primary if spec.primary is not None else section.primary
    try:
        return resolve_plan(
            spec.evaluator.metrics(spec.reference is not None), primary, {**section.margins, **spec.margins}
        )
    except ValueError as error:
        raise ConfigError(
            f"{error} (set by --primary / --margin or the run file's experiment.primary / experiment.margins)"
        ) from None


def declare_plan(out: Path, plan: AnalysisPlan) -> None:
    """Write the plan into ``out/report.json`` before any result exists (the report, written at the end,
    keeps it). A folder whose report declared another plan is another experiment: refused, so the old
    report is never rewritten under new questions."""
    path = out / REPORT_FILE
    try:
        declared = json.loads(path.read_text(encoding="utf-8")).get("plan")
    except (OSError, json.JSONDecodeError):
        declared = None
    current = json.loads(json.dumps(plan.record()))
    if declared is not None and any(declared.get(key) != current[key] for key in PLAN_KEYS):
        raise ConfigError(
            f"{path} declared primary metrics {','.join(declared['primary']) or '(none)'} and margins "
            f"{declared['margins']} before its results; a different --primary or --margin is a new experiment: "
            "give it a new --out (the old report stays as it is)"
        )
    if declared is None:
        atomic_write_json(path, {"plan": plan.record(), "status": "planned: no result yet"})


def model_jobs(spec: ExperimentSpec, runs: Sequence[tuple[Run, RunConfig]]) -> list[ModelJob]:
    """One sample + evaluate job per run, and per seed for the base model."""
    models = [(run.name, run.run_file, run.directory, run.seed) for run, _ in runs]
    if spec.base:
        first = runs[0][0].run_file
        models = [(f"base-seed{seed}", first, None, seed) for seed in spec.seeds] + models
    return [
        ModelJob(
            name=name,
            run_file=run_file,
            run_dir=run_dir,
            seed=seed,
            prompts=spec.prompts,
            batch_size=spec.sample_batch_size,
            samples_dir=spec.out / "samples" / name,
            eval_dir=spec.out / "eval" / name,
            reference=spec.reference,
            evaluator=spec.evaluator,
        )
        for name, run_file, run_dir, seed in models
    ]


def run_experiment(spec: ExperimentSpec, progress: bool = True, log=print) -> ExperimentResults:
    """Prepare, precompute, train, sample and evaluate (skipping what is finished); returns the results
    (the caller writes the report: :func:`crepa.experiment.report.write_report`)."""

    quiet_libraries()
    timer = StageTimer()
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    runs = prepare(spec)
    plan = analysis_plan(spec)
    declare_plan(spec.out, plan)
    slots: list[dict[str, str]] = []
    if spec.launched:  # impossible options stop here, before any work
        slots = launch_slots(spec.processes_per_run, spec.workers, spec.accelerate_config, log)
    configs = [config for _, config in runs]
    log(f"precompute: one shared cache in {configs[0].cache.dir}")
    with timer.stage("precompute"):
        precompute(superset_config(configs), progress=progress)
    # Finished work is found here, from a few files, so a finished experiment starts no worker.
    work = {run.name: {"trained": False} for run, _ in runs}
    pending_runs = [run for run, config in runs if not training_finished(config)]
    jobs = model_jobs(spec, runs)
    rows: dict[str, dict[str, Any]] = {}
    run_files = [run.run_file for run in pending_runs]
    with worker_pool(spec.workers, threads) as pool:
        how = f"{spec.workers} worker(s)"
        if spec.launched:
            how = f"{len(slots)} at once, {spec.processes_per_run} process(es) each"
        where = "CUDA" if torch.cuda.is_available() else "the CPU"  # NVML's answer (see worker_context)
        log(
            f"fine-tune: {len(spec.variants)} variants x {len(spec.seeds)} seeds, {len(pending_runs)} to train "
            f"({how}, on {where})"
        )
        with timer.stage("fine-tune"):
            if spec.launched:
                launch_runs(run_files, slots, spec.processes_per_run, spec.accelerate_config, progress)
            else:
                run_jobs(pool, train_run, run_files, "fine-tune", progress)
        for run in pending_runs:
            work[run.name]["trained"] = True
        for job in jobs:
            metrics = finished_metrics(job)
            if metrics is not None:
                rows[job.name] = metrics
        pending_jobs = [job for job in jobs if job.name not in rows]
        log(f"sample + eval: {len(jobs)} models x {len(spec.prompts)} prompts, {len(pending_jobs)} to do")
        with timer.stage("sample + eval"):
            evaluated = run_jobs(pool, sample_and_evaluate, pending_jobs, "sample + eval", progress)
    for name, metrics, done in evaluated:
        rows[name] = metrics
        work.setdefault(name, {}).update(done)
    rows = {job.name: rows[job.name] for job in jobs}  # in job order, however the workers finished
    return ExperimentResults(
        variants=[{"name": v.name, "label": v.label} for v in spec.variants],
        seeds=list(spec.seeds),
        prompts=list(spec.prompts),
        metrics=list(spec.evaluator.metrics(spec.reference is not None)),
        rows=rows,
        runs=[run.name for run, _ in runs],
        base=spec.base,
        stage_seconds=dict(timer.seconds),
        work=work,
        machine={
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "workers": spec.workers,
            "processes_per_run": spec.processes_per_run,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        out=spec.out,
        plan=plan,
    )


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """One prompt per line (blank lines and ``#`` comments skipped)."""
    try:
        return tuple(read_prompts(path))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--prompts: {error}") from None
