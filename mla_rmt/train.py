"""The loop that runs one trial: steps, metrics, evaluators, checkpoints, preemption.

The train metrics, spectra and activation probes stay on the device until the next flush (a
logging step), which fetches them one step late: no step waits for the host except on the first
step, eval steps (the eval loss is logged at once) and checkpoint steps (a checkpoint never
holds a state whose loss was not checked).
"""
import contextlib
import dataclasses
import functools
import json
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mla_rmt import (activations, attention, checkpoint, config_check, data, diagnostics, hparams, sharding,
                     summaries, tags, tokenizer, workdir as workdir_lib)
from mla_rmt.model import flops_per_token, param_count
from mla_rmt.preemption import Preemption
from mla_rmt.step import make_trainer

# Dense bf16 peak per chip, for MFU. Devices not listed (e.g. CPU) report no MFU unless
# config.train.peak_flops_per_device is set.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class TrialResult:
    status: str                     # "finished" | "preempted"
    step: int
    metrics: dict[str, float]


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _peak_flops(config) -> float | None:
    if config.train.peak_flops_per_device:
        return float(config.train.peak_flops_per_device)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _non_finite(what: str, step: int, workdir: str, ckpt: checkpoint.Checkpointer):
    return FloatingPointError(
        f"{what} at step {step}: stopping this trial. Nothing after the last good checkpoint "
        f"was saved (step {ckpt.latest_step()} in {workdir}/checkpoints). Lower "
        "config.optim.learning_rate or enable config.optim.clip_norm, then run again with "
        "--allow_config_change to resume from it.")


def every(period: int, step: int) -> bool:
    """The cadence of every periodic action of the loop: step is a multiple of period (a period
    of 0 is off)."""
    return period > 0 and step % period == 0


def take_due(pending: list[tuple[int, Any]], step: int, wait: bool) -> list[tuple[int, Any]]:
    """Removes from `pending` ((step made, device value) pairs) and returns those to fetch at
    `step`: all of them with wait, else those made before it (the newest is still running)."""
    due = [(s, v) for s, v in pending if wait or s < step]
    pending[:] = [(s, v) for s, v in pending if not (wait or s < step)]
    return due


class MetricsReporter:
    """The train metrics still on the device, the throughput window, MFU and the finiteness
    check. flush() fetches the steps before the newest one (the newest is still running), or
    all of them with wait=True (before a checkpoint). tokens_per_sec is the last window's;
    run_tokens_per_sec the mean since start_clock (evals and spectra included), which the
    trial's headline reports."""

    def __init__(self, config, cfg, writer, ckpt, workdir: str):
        self.writer, self.ckpt, self.workdir = writer, ckpt, workdir
        self.num_steps = config.train.num_steps
        self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.flops_per_token = flops_per_token(cfg, config.data.seq_len)
        self.peak = _peak_flops(config)
        self.pending: list[tuple[int, dict]] = []     # (step, device metrics)
        self.last: dict[str, float] = {}              # the newest fetched row, without its step
        self.tokens_per_sec: float | None = None
        self.run_tokens_per_sec: float | None = None
        self._window_start, self._window_steps = None, 0
        self._clock: tuple[int, float] | None = None   # (step, time) the run's mean counts from

    def start_clock(self, step: int) -> None:
        """Called once step `step` is complete (the first step compiles, so it is left out)."""
        self._clock = (step, time.perf_counter())

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, {k: v for k, v in metrics.items() if k != "spectra"}))
        self._window_steps += 1

    def flush(self, step: int, wait: bool = False) -> None:
        rows = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()})
                for s, m in take_due(self.pending, step, wait)]
        for row in rows:
            if not np.isfinite(row[tags.TRAIN_LOSS]):
                raise _non_finite(f"{tags.TRAIN_LOSS} is {row[tags.TRAIN_LOSS]}", row["step"], self.workdir, self.ckpt)
        self.ckpt.check_for_errors()     # a failed async save is reported now, naming the directory
        for row in rows:
            self.writer.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
        if not rows:
            return
        self.last = {k: v for k, v in rows[-1].items() if k != "step"}
        now = time.perf_counter()
        if self._clock is not None and rows[-1]["step"] > self._clock[0]:
            first, start = self._clock
            self.run_tokens_per_sec = self.tokens_per_step * (rows[-1]["step"] - first) / (now - start)
        if self._window_start is not None and self._window_steps:
            seconds = (now - self._window_start) / self._window_steps
            self.tokens_per_sec = self.tokens_per_step / seconds
            perf = {tags.PERF_TOKENS_PER_SEC: self.tokens_per_sec, tags.PERF_STEP_TIME_SEC: seconds}
            if self.peak:
                perf[tags.PERF_MFU] = self.tokens_per_sec * self.flops_per_token / (self.peak * jax.device_count())
            self.writer.scalars(step, perf)
            logging.info("step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %s tok/s | ETA %s",
                         rows[-1]["step"], self.num_steps, self.last[tags.TRAIN_LOSS],
                         self.last[tags.TRAIN_LEARNING_RATE], self.last[tags.TRAIN_GRAD_NORM],
                         f"{self.tokens_per_sec:,.0f}", _format_seconds(seconds * (self.num_steps - step)))
        self._window_start, self._window_steps = now, 0


class Evaluator(Protocol):
    """What the loop runs besides the train step; results go to the writer."""

    def run(self, step: int, state, metrics: dict) -> None:
        """Called after every step with the state after `step` steps and the step's metrics."""

    def flush(self, step: int, wait: bool = False) -> None:
        """Writes the results still on the device (those of steps before `step`, or all)."""

    def final(self) -> dict[str, float]:
        """The newest results that belong in result.json and the HParams row."""


class EvalLoss:
    """The mean loss over the held-out batches every eval_every steps and at the last step;
    fetched and logged at once."""

    def __init__(self, config, trainer, eval_batches, writer):
        self.trainer, self.eval_batches, self.writer = trainer, eval_batches, writer
        self.period, self.num_steps = config.train.eval_every, config.train.num_steps
        self.last: dict[str, float] = {}

    def evaluate(self, step: int, params) -> None:
        loss = float(np.mean([self.trainer.eval_step(params, b) for b in self.eval_batches]))
        self.last = {tags.EVAL_LOSS: loss, tags.EVAL_PERPLEXITY: float(np.exp(loss))}
        self.writer.scalars(step, self.last)
        logging.info("step %d | eval loss %.4f | perplexity %.2f", step, loss, self.last[tags.EVAL_PERPLEXITY])

    def run(self, step, state, metrics):
        del metrics
        if every(self.period, step) or step == self.num_steps:
            self.evaluate(step, state.params)

    def flush(self, step, wait=False):
        del step, wait

    def final(self):
        return self.last


class WeightSpectra:
    """The spectra the spectra step returns (of the params it received): scalars, eigenvalue
    histograms, and every images_every steps the ESD of each layer and the layer x step heatmaps
    of mp_gap and outlier_energy, rendered on the writer's thread."""

    HEATMAPS = ("mp_gap", "outlier_energy")

    def __init__(self, config, trainer, writer):
        self.writer = writer
        self.specs = {m.name: m for m in trainer.spectra_specs}
        self.images_every = config.diagnostics.images_every or config.diagnostics.every or 1
        self.pending: list[tuple[int, dict]] = []      # (step made, device spectra)
        self.history: dict[str, dict[str, list]] = {}  # matrix -> steps and [L] values per step
        self.last: dict[str, float] = {}

    def run(self, step, state, metrics):
        del state
        spectra = metrics.get("spectra")
        if spectra is not None:
            self.pending.append((step, spectra))

    def flush(self, step, wait=False):
        for made, spectra in take_due(self.pending, step, wait):   # of the params after made - 1
            self.write(made - 1, jax.device_get(spectra))

    def final(self):
        return self.last

    def write(self, params_step: int, spectra: dict) -> None:
        self.last = diagnostics.layer_scalars(spectra)
        self.writer.scalars(params_step, self.last)
        for name, values in spectra.items():
            for layer, eigs in enumerate(values["eigenvalues"]):
                self.writer.histogram(params_step, tags.eigenvalues(name, layer), eigs)
            history = self.history.setdefault(name, {"steps": [], **{m: [] for m in self.HEATMAPS}})
            history["steps"].append(params_step)
            for metric in self.HEATMAPS:
                v = np.asarray(values[metric], np.float64)
                history[metric].append(v.reshape(v.shape[0], -1).mean(axis=1))  # head_mean of per-head ones
        if self.writer.enabled and not params_step % self.images_every:
            self.writer.images_later(params_step, functools.partial(self.render, params_step, spectra, {
                tags.heatmap(name, metric): (
                    np.stack(history[metric], axis=1), list(history["steps"]), f"{name}: {metric}", metric)
                for name, history in self.history.items() for metric in self.HEATMAPS}))

    def render(self, params_step: int, spectra: dict, heatmaps: dict) -> dict:
        """{tag: image} on the writer's thread; per-head ESDs pool the layer's heads."""
        # Only a trial that draws loads matplotlib and pandas.
        from mla_rmt import plots  # pylint: disable=import-outside-toplevel
        images = {}
        for name, values in spectra.items():
            spec = self.specs[name]
            for layer, eigs in enumerate(values["eigenvalues"]):
                fig = plots.esd_figure(eigs, spec.null, values["lambda_plus"][layer],
                                       f"{name} layer {layer}, step {params_step}", gammas=spec.gammas)
                images[tags.esd(name, layer)] = plots.figure_to_image(fig)
        for tag, args in heatmaps.items():
            images[tag] = plots.figure_to_image(plots.layer_step_heatmap(*args))
        return images


class ActivationProbes:
    """The activation diagnostics (mla_rmt/activations.py) of the held-out probe batch every
    activations_every steps (0 = the spectra cadence)."""

    def __init__(self, config, cfg, probe_tokens, writer):
        self.writer, self.probe_tokens = writer, probe_tokens
        self.period = config.diagnostics.activations_every or config.diagnostics.every
        self.probe = jax.jit(functools.partial(activations.probe, cfg))
        self.pending: list[tuple[int, dict]] = []      # (step, device stats)

    def run(self, step, state, metrics):
        del metrics
        if every(self.period, step):
            self.pending.append((step, self.probe(state.params, self.probe_tokens)))

    def flush(self, step, wait=False):
        for probe_step, stats in take_due(self.pending, step, wait):
            self.writer.scalars(probe_step, {
                tags.activations(metric, layer): float(v)
                for metric, per_layer in jax.device_get(stats).items() for layer, v in enumerate(per_layer)})

    def final(self):
        return {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, overrides: dict | None = None,
                       allow_config_change: bool = False) -> TrialResult:
    """Trains one trial in `workdir`, resuming from its newest checkpoint that restores.

    The workdir is held for the run (workdir.claim): a second job in it, or a resume under a
    config that trains something else, is refused. `overrides` are the trial's swept values,
    shown in the HParams table.
    """
    cfg = config_check.validate(config)
    workdir_path = epath.Path(workdir)
    with workdir_lib.claim(workdir_path, config, allow_config_change) as changed, \
            contextlib.ExitStack() as cleanup:
        result, tokens_per_sec = _train(config, cfg, workdir_path, overrides or {}, changed, cleanup)
    # Here the saves in flight have finished (cleanup closed the checkpointer): the last
    # checkpoint is complete.
    if result.status == "finished":
        m = result.metrics
        logging.info("Trial finished at step %d: train loss %s, eval loss %s, perplexity %s, "
                     "%s tok/s (mean after the first step); "
                     "every final metric in %s", result.step, _fmt(m.get(tags.TRAIN_LOSS)),
                     _fmt(m.get(tags.EVAL_LOSS)), _fmt(m.get(tags.EVAL_PERPLEXITY)),
                     "-" if tokens_per_sec is None else f"{tokens_per_sec:,.0f}",
                     workdir_path / workdir_lib.RESULT_FILE)
    else:
        logging.warning("Stopped at step %d after SIGTERM; the run resumes from there.", result.step)
    return result


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _train(config, cfg, workdir_path, overrides, changed, cleanup: contextlib.ExitStack):
    """The trial and its mean throughput; what it opens is closed by `cleanup` however it ends
    (an open data iterator's threads would keep the process alive after an error or Ctrl-C)."""
    workdir = str(workdir_path)
    mesh = sharding.make_mesh(config.mesh)
    config_check.check_mesh(config, mesh)
    num_steps = config.train.num_steps

    logging.info("Model: %s, %s parameters; attention %s", config.model.preset,
                 f"{param_count(cfg):,}", attention.describe(cfg))
    logging.info("Mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].device_kind, jax.process_count())

    tok = tokenizer.get_tokenizer(config.data, cfg.vocab_size)
    train_iter = data.make_train_iterator(config, tok, jax.process_index(), jax.process_count())
    cleanup.callback(train_iter.close)
    eval_batches = [sharding.global_batch(b, mesh) for b in data.make_eval_batches(
        config, tok, config.train.eval_batches, jax.process_index(), jax.process_count())]

    trainer = make_trainer(config, cfg, mesh)
    ckpt = checkpoint.Checkpointer(str(workdir_path / "checkpoints"), config.train.keep_checkpoints)
    cleanup.callback(ckpt.close)           # waits for saves in flight
    state, start_step = ckpt.restore_latest(trainer.abstract_state, train_iter)
    if state is None:
        state, start_step = trainer.init_state(jax.random.key(config.seed)), 0
    else:
        logging.info("Resuming from the checkpoint at step %d", start_step)

    writer = summaries.SummaryWriter(workdir)
    cleanup.callback(writer.close)
    if start_step == 0:
        writer.config(config)
    if jax.process_index() == 0:   # config.json: what `mla_rmt.analyze` rebuilds the model from
        workdir_lib.record_config(workdir_path, config, start_step, changed)

    reporter = MetricsReporter(config, cfg, writer, ckpt, workdir)
    eval_loss = EvalLoss(config, trainer, eval_batches, writer)
    evaluators: list[Evaluator] = [
        WeightSpectra(config, trainer, writer), eval_loss,
        ActivationProbes(config, cfg, eval_batches[0]["inputs"][: config.diagnostics.probe_batch], writer)]

    def flush(step, wait=False):
        for evaluator in evaluators:
            evaluator.flush(step, wait)
        reporter.flush(step, wait)

    def final_metrics():
        out = dict(reporter.last)
        for evaluator in evaluators:
            out.update(evaluator.final())
        return out

    def write_result(step, status):
        """result.json (finished trials) and the HParams row, flushed with every scalar so far."""
        metrics = final_metrics()
        if jax.process_index() == 0 and status == "finished":
            (workdir_path / workdir_lib.RESULT_FILE).write_text(json.dumps({"step": step, **metrics}, indent=1))
        hparams.write(workdir, config, overrides, metrics, step, status)

    status = "finished"
    result_written = False
    with Preemption(config.train.preemption_check_every) as preemption:
        step = start_step
        loop_start = time.perf_counter()
        while step < num_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = trainer.step_for(step)(state, batch)
            step += 1
            for evaluator in evaluators:
                evaluator.run(step, state, metrics)
            reporter.add(step, metrics)
            if step == start_step + 1:     # the first step includes compilation
                jax.block_until_ready(metrics)
                logging.info("First step (with compilation) took %.1fs", time.perf_counter() - loop_start)
                flush(step, wait=True)
                reporter.start_clock(step)
            if every(config.train.log_every, step):
                flush(step)
            stop = preemption.should_stop(step) and step < num_steps
            if every(config.train.checkpoint_every, step) or step == num_steps or stop:
                flush(step, wait=True)     # never checkpoint a state with a non-finite loss
                if not _all_finite(state.params):
                    raise _non_finite("the parameters are not finite", step, workdir, ckpt)
                if step == num_steps or stop:   # the record of the run precedes its checkpoint
                    status = "finished" if step == num_steps else "preempted"
                    write_result(step, status)
                    result_written = True
                writer.flush()             # every scalar so far is on disk before the commit
                ckpt.save(step, state, train_iter, force=True)
            if preemption.interrupted:     # Ctrl-C during this step: stop before the next one
                raise KeyboardInterrupt("Ctrl-C during training")
            if stop:
                break
        if not result_written:             # resumed from the final checkpoint: nothing ran
            if not eval_loss.last:
                eval_loss.evaluate(step, state.params)
            write_result(step, status)
    return TrialResult(status=status, step=step, metrics=final_metrics()), reporter.run_tokens_per_sec
