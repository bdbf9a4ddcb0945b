"""The training recipe: `crepa train` as set-up, step and loop.

    config -> checks (no weights yet) -> transformer (+ LoRA) -> CREPA regularizer -> cached data
    -> optimiser / LR schedule -> accelerate          (:func:`crepa.train.setup.build_run`)
    -> loop: noise, forward, diffusion + alignment loss (:func:`crepa.train.step.step_loss`),
       backward, clip, guarded step (:func:`optimizer_step`) -> logs, checkpoints, validation
    -> LoRA + projector + summary                       (:func:`finish`)

Exact resume: noise and timesteps come from a generator seeded by (seed, step, rank), the batch
order is a function of (seed, position), and checkpoints hold optimiser, LR scheduler, alignment
schedule and the global RNG states (LoRA dropout), so on CPU a resumed run repeats an
uninterrupted one step for step.
"""

from __future__ import annotations

import json
import math
import signal
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from crepa.cache.atomic import atomic_write_json
from crepa.config import RunConfig
from crepa.models.loading import describe_device
from crepa.rundir import (
    LORA_FILE,
    SUMMARY_FILE,
    TRANSFORMER_DIR,
    VALIDATION_DIR,
    checkpoint_dirs,
    raw_name,
    side_module_file,
)
from crepa.train import checkpoint as ckpt
from crepa.train.guard import loss_scale_search
from crepa.train.lora import save_lora
from crepa.train.parallel import average_gradients, clip_grad_norm, exchange_objects
from crepa.train.preflight import hold_output
from crepa.train.setup import build_run, startup_summary
from crepa.train.state import TrainingStopped, TrainingSummary, TrainState
from crepa.train.step import step_loss, to_device
from crepa.train.validation import run_validation


def train(
    config: RunConfig, resume: str | None = None, progress: bool = True, announce: bool = True
) -> TrainingSummary:
    """Fine-tune ``config.model`` on the precomputed cache; returns (and writes) the summary.
    The output folder is locked for the run (a second run into it is refused). ``announce`` prints the
    trainer options at the start (an experiment's runs, many side by side, keep them in their run file)."""
    with hold_output(config):
        return _train(config, resume, progress, announce)


def _train(config: RunConfig, resume: str | None, progress: bool, announce: bool) -> TrainingSummary:
    """The loop: one optimiser step at a time, then logs, checkpoints and validation when due."""
    state = build_run(config, resume)
    accelerator, run, max_steps = state.accelerator, state.progress, config.train.max_steps
    if announce:
        accelerator.print(startup_summary(config))
    if torch.cuda.is_available():  # this run's peak (a worker's earlier jobs, or loading, not counted)
        torch.cuda.reset_peak_memory_stats()
    stop = _StopFlag()
    bar = tqdm(
        total=max_steps,
        initial=run.step,
        disable=not (progress and accelerator.is_main_process),
        desc="train",
        unit="step",
    )
    while run.step < max_steps:
        step_metrics = optimizer_step(state)
        run.step += 1
        if state.ema is not None:
            state.ema.update(run.step)
        bar.update(1)
        if run.step % config.logging.every == 0 or run.step == max_steps:
            last = _log_metrics(state, step_metrics)
            bar.set_postfix(
                loss=f"{last['loss/total']:.4f}", score=f"{last.get('crepa/score', float('nan')):.3f}"
            )
        if run.step % config.train.checkpoint_every == 0 or run.step == max_steps or stop.requested:
            save_checkpoint(state)
        if (
            config.validation.every
            and config.validation.prompts
            and (run.step % config.validation.every == 0 or run.step == max_steps)
            and (accelerator.is_main_process or state.sharding == "fsdp")
        ):
            _validate(state)
        if stop.requested:
            state.interrupted = True
            break
    bar.close()
    stop.restore()
    state.stop_signal = stop.signal
    summary = finish(state)
    for tracker in accelerator.trackers:  # not accelerator.end_training(): it destroys the process group,
        tracker.finish()  # whose teardown can hang under gloo (see crepa.train.parallel.exit_process)
    state.data = None  # DataLoader workers stop here
    accelerator.wait_for_everyone()
    return summary


def optimizer_step(state: TrainState) -> dict[str, torch.Tensor]:
    """One optimiser step: accumulate ``train.gradient_accumulation`` micro-batches, average the side
    modules' gradients, unscale, clip, then the guarded update (undone when the gradient or the new
    weights are not finite; an fp16 loss-scale search step is skipped by the scaler, not counted as a
    failure: :func:`~crepa.train.guard.loss_scale_search`) and the LR schedule. Returns the step's detached metrics (no host sync
    but the guard's one)."""
    config, accelerator, run = state.config, state.accelerator, state.progress
    step_metrics: dict[str, torch.Tensor] = {}
    accumulation = config.train.gradient_accumulation
    for micro in range(accumulation):
        batch = to_device(next(state.data), accelerator.device)
        run.position += 1
        with _gradient_sync(state, sync=micro == accumulation - 1):
            generator = torch.Generator(accelerator.device).manual_seed(
                (config.train.seed * 1_000_003 + run.step) * 4099 + accelerator.process_index
            )
            loss, metrics = step_loss(state.parts, batch, run.step, generator)
            step_metrics |= metrics
            accelerator.backward(loss)  # divides by the accumulation count
    if accelerator.num_processes > 1:
        average_gradients([p for module in state.side_modules.values() for p in module.parameters()])
    accelerator.unscale_gradients()  # fp16: GradScaler's scale off before the norm
    grad_norm = clip_grad_norm(state.trainable, config.optim.max_grad_norm)
    # The one host sync per optimiser step: an update with a non-finite gradient or leaving
    # non-finite weights is undone (never trained on, never saved). The norm is global.
    grad_ok, weights_ok = state.guard.step(grad_norm)
    searching = (
        None if grad_ok else loss_scale_search(accelerator.scaler, accelerator.optimizer_step_was_skipped)
    )
    if grad_ok and weights_ok:
        run.nonfinite_streak = 0
    elif searching is not None:
        if accelerator.is_main_process:
            tqdm.write(
                f"step {run.step + 1}: fp16 gradient overflow, update skipped, loss scale now {searching:g}"
            )
    else:
        run.skipped_nonfinite += 1
        run.nonfinite_streak += 1
        what = "gradient" if not grad_ok else "weights after the update"
        if accelerator.is_main_process:
            tqdm.write(
                f"step {run.step + 1}: non-finite {what}, update undone ({run.nonfinite_streak} in a row)"
            )
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    step_metrics["train/grad_norm"] = grad_norm.detach()
    if run.nonfinite_streak >= config.train.max_nonfinite_steps:
        raise TrainingStopped(
            f"{run.nonfinite_streak} optimiser steps in a row had a non-finite loss, gradient or updated "
            f"weights (step {run.step}; each was undone, no non-finite weight was saved). "
            "Try a lower optim.lr, train.mixed_precision = 'bf16' instead of 'fp16', model.dtype = 'bf16' "
            "or 'fp32', or a smaller crepa.weight."
        )
    return step_metrics


def save_checkpoint(state: TrainState) -> None:
    """Checkpoint ``checkpoints/step-XXXXXX`` of the current step, written beside and renamed into
    place; every rank takes part in gathering sharded tensors, rank 0 writes them."""
    accelerator, root, step = state.accelerator, state.checkpoints, state.progress.step
    staged = ckpt.staging_dir(root, step)
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    tensors = ckpt.trainable_state(state.modules)
    ema = None if state.ema is None else state.ema.state_dict()
    document = state.state_dict()
    ckpt.write_checkpoint_files(
        staged,
        tensors if main else None,
        document if main else None,
        accelerator.process_index,
        ema if main else None,
    )
    accelerator.wait_for_everyone()
    if main:
        ckpt.publish_checkpoint(root, step, state.config.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def finish(state: TrainState) -> TrainingSummary:
    """The run's summary (per-rank weight checksums and cutoff facts exchanged), and on the main
    process the final LoRA or transformer, the side modules' files and ``training_summary.json``."""
    config, accelerator = state.config, state.accelerator
    output = config.output.dir
    # float64 sum of |w| per rank: equal on every rank when data parallelism kept them in sync
    trained = ckpt.trainable_state(state.modules)  # whole tensors (gathered from the shards under FSDP)
    checksum = float(sum(tensor.double().abs().sum() for tensor in trained.values()))
    schedule = None if state.regularizer is None else state.regularizer.schedule
    local_ema = None if schedule is None or schedule.local_ema is None else float(schedule.local_ema)
    cutoff = None if schedule is None else schedule.cut_step
    per_rank = [(checksum, cutoff, local_ema)]
    per_rank = exchange_objects(per_rank[0]) if accelerator.num_processes > 1 else per_rank
    latest = checkpoint_dirs(state.checkpoints)
    single = "ddp" if accelerator.num_processes > 1 else "single"
    summary = TrainingSummary(
        steps=state.progress.step,
        skipped_nonfinite=state.progress.skipped_nonfinite,
        seconds=time.perf_counter() - state.started,
        peak_memory_mb=_peak_memory_mb(),
        final_metrics=state.last_metrics,
        interrupted=state.interrupted,
        rank_weight_checksums=[entry[0] for entry in per_rank],
        rank_cutoff_steps=[entry[1] for entry in per_rank],
        rank_score_ema=[entry[2] for entry in per_rank],
        output_dir=str(output),
        checkpoint=str(latest[-1]) if latest else None,
        parallelism=state.sharding if state.sharding != "none" else single,
        processes=accelerator.num_processes,
        device=describe_device(accelerator.device),
        config=json.loads(config.model_dump_json()),
        stop_signal=state.stop_signal,
        start_step=state.start_step,
    )
    if state.ema is None:
        _write_final_weights(state, trained, raw=False)
    else:  # the EMA under the default names, the raw weights beside them
        with state.ema.swapped_in():
            _write_final_weights(state, ckpt.trainable_state(state.modules), raw=False)
        _write_final_weights(state, trained, raw=True)
    # A resume with nothing left to train keeps the summary of the run that trained (its time and
    # peak memory); the final weights above are rewritten as they were (or written, if a stop cut
    # the run after its last checkpoint).
    nothing_trained = state.start_step == state.progress.step and (output / SUMMARY_FILE).is_file()
    if accelerator.is_main_process and not nothing_trained:
        atomic_write_json(output / SUMMARY_FILE, asdict(summary))
    return summary


def _write_final_weights(state: TrainState, trained: dict[str, torch.Tensor], raw: bool) -> None:
    """The final LoRA (from ``trained``, whole tensors by checkpoint name) or transformer folder and
    the side modules' files, written by the main process; ``raw``: the *_raw names of an EMA run."""
    if not state.accelerator.is_main_process:
        return
    output, config = state.config.output.dir, state.config
    named = raw_name if raw else str
    model = state.modules["transformer"]
    if config.lora.enabled:
        prefix = "transformer."
        lora = {key.removeprefix(prefix): value for key, value in trained.items() if key.startswith(prefix)}
        save_lora(model, state.family, output, state=lora, weight_name=named(LORA_FILE))
    else:
        model.save_pretrained(output / named(TRANSFORMER_DIR))
    for name, module in state.side_modules.items():  # projector.safetensors, repvideo_gates.safetensors
        tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
        save_file(tensors, str(output / named(side_module_file(name))))


# ---------------------------------------------------------------- pieces of the loop
def _gradient_sync(state: TrainState, sync: bool) -> AbstractContextManager:
    """Gradient reduction of the transformer only on the last micro-batch of an accumulation."""
    if state.sharding == "fsdp":
        state.transformer.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else state.accelerator.no_sync(state.transformer)


def _log_metrics(state: TrainState, step_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Host sync at the log interval: the step's metrics to the trackers and ``metrics.jsonl``."""
    accelerator, run = state.accelerator, state.progress
    last = {key: float(value) for key, value in step_metrics.items()}
    last["train/lr"] = state.lr_scheduler.get_last_lr()[0]
    last["train/skipped_nonfinite"] = run.skipped_nonfinite
    accelerator.log(last, step=run.step)
    if accelerator.is_main_process:
        with open(state.metrics_log, "a") as handle:
            values = {key: (None if math.isnan(value) else value) for key, value in last.items()}
            handle.write(json.dumps({"step": run.step, **values}) + "\n")
    state.last_metrics = last
    return last


def _validate(state: TrainState) -> None:
    """Sample the validation prompts. A sharded model's forward is a collective, so under FSDP every
    rank samples (the same clips) and only rank 0's files are kept."""
    config, accelerator, step = state.config, state.accelerator, state.progress.step
    model = accelerator.unwrap_model(state.transformer)
    weights = (
        state.ema.swapped_in() if state.ema is not None and config.ema.validate_with_ema else nullcontext()
    )
    with weights:
        if accelerator.is_main_process:
            run_validation(config, state.family, model, config.output.dir / VALIDATION_DIR, step)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                run_validation(config, state.family, model, Path(scratch), step)
    if state.sharding == "fsdp":
        accelerator.wait_for_everyone()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # Unix only: imported where it is read

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _StopFlag:
    """Ctrl-C / SIGTERM ask for a checkpoint at the end of the current step, then a clean stop."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
