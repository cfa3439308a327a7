"""The train state, the jitted train/eval steps and the loop that runs one trial.

Metrics stay on the device until a logging step, so no step waits for the host.
"""
import contextlib
import dataclasses
import functools
import json
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from mla_rmt import (activations, attention, checkpoint, data, diagnostics, distributed, hparams, plots,
                     sharding, summaries, tokenizer, workdir as workdir_lib)
from mla_rmt.model import Transformer, flops_per_token, param_count
from mla_rmt.model_config import ConfigError, ModelConfig

# Dense bf16 peak per chip, for MFU. Devices not listed (e.g. CPU) report no MFU unless
# config.train.peak_flops_per_device is set.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of it at num_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
        decay_steps=max(num_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * optim.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: norm scales are left alone."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    adamw = optax.adamw(learning_rate_schedule(o, config.train.num_steps), b1=o.b1, b2=o.b2,
                        eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


def cross_entropy(logits_BxTxV, targets_BxT):
    """Mean next-token cross-entropy in fp32 (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def loss_chunks(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """How many sequence chunks the chunked loss uses: the fewest that divide seq_len and hold
    at most chunk_tokens tokens each (batch x chunk length); seq_len when none is that small."""
    return next((n for n in range(1, seq_len + 1)
                 if seq_len % n == 0 and batch * (seq_len // n) <= chunk_tokens), seq_len)


def _chunk_pieces(x_BxTxD, targets_BxT, num_chunks):
    """[n, B, T/n, ...] views of the inputs, chunked along the sequence (the batch axis, which
    is the sharded one, stays whole in every chunk)."""
    b, t = targets_BxT.shape
    c = t // num_chunks
    x_NxBxCxD = jnp.moveaxis(x_BxTxD.reshape(b, num_chunks, c, -1), 1, 0)
    targets_NxBxC = jnp.moveaxis(targets_BxT.reshape(b, num_chunks, c), 1, 0)
    return x_NxBxCxD, targets_NxBxC


def _chunk_logits(x_BxCxD, head_DxV):
    """Logits of one chunk in the compute dtype, as the plain path rounds them; every consumer
    widens them to fp32 itself, so no fp32 copy of the logits is ever written."""
    return jnp.einsum("bcd,dv->bcv", x_BxCxD, head_DxV)


def logsumexp_one_pass(logits_BxV):
    """log sum_v exp(logits) over the last axis in fp32, reading the logits once.

    A reduction over (running max m, sum s of exp(x - m)) pairs: one pass over the vocabulary
    instead of jax.nn.logsumexp's max pass then sum pass (the logits of a chunk are the largest
    array of the step, and this is a third of the loss's memory traffic). Two pairs merge with
    one exp: the smaller max's sum is scaled by e = exp(-|m - m'|) before the two are added.
    """
    x = logits_BxV.astype(jnp.float32)

    def merge(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        gap = m_b - m_a
        e = jnp.exp(-jnp.abs(gap))
        return jnp.maximum(m_a, m_b), jnp.where(gap > 0, s_a * e + s_b, s_a + s_b * e)

    # A finite start: gaps are never -inf - -inf (nan); an -inf logit adds exp(-inf) = 0.
    start = (jnp.float32(jnp.finfo(jnp.float32).min), jnp.float32(0.0))
    max_B, sum_B = jax.lax.reduce((x, jnp.ones_like(x)), start, merge, (x.ndim - 1,))
    return max_B + jnp.log(sum_B)


def _chunk_loss_sum(logits_BxCxV, targets_BxC, one_pass):
    lse_BxC = (logsumexp_one_pass(logits_BxCxV) if one_pass
               else jax.nn.logsumexp(logits_BxCxV.astype(jnp.float32), axis=-1))
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return jnp.sum(lse_BxC - target_BxC.astype(jnp.float32)), lse_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_ce(x_BxTxD, head_DxV, targets_BxT, num_chunks, one_pass):
    x_NxBxCxD, targets_NxBxC = _chunk_pieces(x_BxTxD, targets_BxT, num_chunks)
    head_c = head_DxV.astype(x_BxTxD.dtype)

    def body(total, chunk):
        x_BxCxD, targets_BxC = chunk
        loss_sum, _ = _chunk_loss_sum(_chunk_logits(x_BxCxD, head_c), targets_BxC, one_pass)
        return total + loss_sum, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NxBxCxD, targets_NxBxC))
    return total / targets_BxT.size


def _chunked_ce_fwd(x_BxTxD, head_DxV, targets_BxT, num_chunks, one_pass):
    """The loss and both gradients in one pass over the chunks: each chunk's logits are made,
    used for the loss and for d(loss)/d(logits), and dropped; the backward pass only scales."""
    b, t = targets_BxT.shape
    inv_count = 1.0 / targets_BxT.size
    x_NxBxCxD, targets_NxBxC = _chunk_pieces(x_BxTxD, targets_BxT, num_chunks)
    head_c = head_DxV.astype(x_BxTxD.dtype)

    def body(carry, chunk):
        total, dhead_DxV = carry
        x_BxCxD, targets_BxC = chunk
        logits_BxCxV = _chunk_logits(x_BxCxD, head_c)
        loss_sum, lse_BxC = _chunk_loss_sum(logits_BxCxV, targets_BxC, one_pass)
        probs_BxCxV = jnp.exp(logits_BxCxV.astype(jnp.float32) - lse_BxC[..., None])
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2) == targets_BxC[..., None]
        # d(mean loss)/d(logits), rounded to the compute dtype as the plain path's cotangent is
        dlogits_BxCxV = ((jnp.where(is_target, probs_BxCxV - 1.0, probs_BxCxV)) * inv_count
                         ).astype(x_BxCxD.dtype)
        dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, head_c,
                              preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
        dhead_DxV = dhead_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                           preferred_element_type=jnp.float32)
        return (total + loss_sum, dhead_DxV), dx_BxCxD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_DxV.shape, jnp.float32))
    (total, dhead_DxV), dx_NxBxCxD = jax.lax.scan(body, init, (x_NxBxCxD, targets_NxBxC))
    dx_BxTxD = jnp.moveaxis(dx_NxBxCxD, 0, 1).reshape(b, t, -1)
    return total * inv_count, (dx_BxTxD, dhead_DxV.astype(head_DxV.dtype))


def _chunked_ce_bwd(num_chunks, one_pass, residuals, g):
    del num_chunks, one_pass
    dx_BxTxD, dhead_DxV = residuals
    return (dx_BxTxD * g.astype(dx_BxTxD.dtype), dhead_DxV * g.astype(dhead_DxV.dtype), None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(x_BxTxD, head_DxV, targets_BxT, chunk_tokens: int = 8192,
                          one_pass: bool = False):
    """cross_entropy(x @ head, targets) without the whole batch's logits: the LM head, the
    log-sum-exp and the gradients run over sequence chunks of at most chunk_tokens tokens
    under lax.scan, so at most one chunk's logits exist at a time.

    A custom VJP computes d/dx and d/dhead while each chunk's logits are live (the backward
    pass only scales them), so nothing is recomputed, unlike jax.checkpoint around the chunk:
    the head's matmul FLOPs are the plain path's. The head's gradient accumulates in fp32.
    Numerics are the plain path's: logits and their cotangent rounded to the compute dtype,
    log-sum-exp and softmax in fp32; with one_pass, the log-sum-exp reads the logits once
    (logsumexp_one_pass: fewer bytes, more arithmetic; BENCHMARKS.md).
    """
    b, t = targets_BxT.shape
    with jax.named_scope("cross_entropy"):
        return _chunked_ce(x_BxTxD, head_DxV, targets_BxT, loss_chunks(b, t, chunk_tokens),
                           one_pass)


def batch_loss(params, batch, *, model, loss_chunk_tokens: int = 0, loss_one_pass: bool = False):
    """Mean next-token loss of a batch; chunked over the sequence when loss_chunk_tokens > 0."""
    if loss_chunk_tokens > 0:
        x_BxTxD, head_DxV = model.apply({"params": params}, batch["inputs"], return_hidden=True)
        return chunked_cross_entropy(x_BxTxD, head_DxV, batch["targets"], loss_chunk_tokens,
                                     loss_one_pass)
    return cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])


def microbatches(batch, microbatch_size: int):
    """{k: [B, ...]} -> {k: [B / m, m, ...]}: microbatch i holds rows i, i + B/m, i + 2B/m, ...

    Strided rather than contiguous, so that with the batch split in blocks over the devices
    every microbatch is spread evenly over them (each device keeps computing on its own rows).
    """
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(microbatch_size, b // microbatch_size, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, optimizer, schedule, spectra_fn=None, every=0,
               microbatch_size: int = 0, loss_chunk_tokens: int = 0, loss_one_pass: bool = False,
               microbatch_sharding=None):
    """One optimizer step; with spectra_fn, the weight spectra of the incoming params every
    `every` steps under lax.cond (other steps return zeros; the trainer runs the step without
    spectra_fn between spectra steps, see Trainer.step_for).

    With 0 < microbatch_size < batch rows, the gradients of B / microbatch_size microbatches
    are summed in fp32 under lax.scan and averaged, then one update is applied: the same step
    as on the whole batch (to rounding), with the activations of one microbatch alive at once.
    """
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, model=model,
                                                   loss_chunk_tokens=loss_chunk_tokens,
                                                   loss_one_pass=loss_one_pass))
    rows = batch["inputs"].shape[0]
    if 0 < microbatch_size < rows:
        if rows % microbatch_size:
            raise ConfigError(f"config.train.microbatch_size: {microbatch_size} does not divide "
                              f"the batch of {rows} rows")
        num_micro = rows // microbatch_size
        micro = microbatches(batch, microbatch_size)
        if microbatch_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)

        def accumulate(carry, microbatch):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, microbatch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
        loss = loss_sum / num_micro
        grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, state.params)
    else:
        loss, grads = grad_fn(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
               "train/learning_rate": schedule(state.step)}
    if spectra_fn is not None:
        # The spectra of the incoming params, ordered after the update by the barrier: on a GPU
        # a conditional waits on the host for its predicate, which mid-step would leave the
        # rest of the step's launches exposed. Only the attention weights are kept past the
        # in-place update (all the spectra read).
        attention_params, _ = jax.lax.optimization_barrier(
            (state.params["layers"]["attention"], params))
        incoming = {"layers": {"attention": attention_params}}
        shapes = jax.eval_shape(spectra_fn, incoming)
        metrics["spectra"] = jax.lax.cond(state.step % every == 0, spectra_fn,
                                          lambda _: diagnostics.empty_like(shapes), incoming)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model, loss_chunk_tokens: int = 0, loss_one_pass: bool = False):
    return batch_loss(params, batch, model=model, loss_chunk_tokens=loss_chunk_tokens,
                      loss_one_pass=loss_one_pass)


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Every check that can fail before data is read or anything compiles."""
    cfg = ModelConfig.from_config(config.model)
    t = config.train
    for field in ("num_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "preemption_check_every"):
        if t[field] <= 0:
            raise ConfigError(f"config.train.{field}: must be positive, got {t[field]}")
    for field in ("seq_len", "global_batch_size"):
        if config.data[field] <= 0:
            raise ConfigError(f"config.data.{field}: must be positive, got {config.data[field]}")
    micro = config.train.get("microbatch_size", 0)
    if micro < 0 or (micro and config.data.global_batch_size % micro):
        raise ConfigError(f"config.train.microbatch_size: {micro} must be 0 (off) or a positive "
                          f"divisor of config.data.global_batch_size={config.data.global_batch_size}")
    if config.train.get("loss_chunk_tokens", 0) < 0:
        raise ConfigError("config.train.loss_chunk_tokens: must be >= 0 (0 = plain loss), got "
                          f"{config.train.loss_chunk_tokens}")
    images_every = config.diagnostics.get("images_every", 0)
    if images_every < 0 or (images_every and config.diagnostics.every
                            and images_every % config.diagnostics.every):
        raise ConfigError(f"config.diagnostics.images_every: {images_every} must be 0 (with every "
                          f"spectra step) or a multiple of diagnostics.every={config.diagnostics.every}")
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"config.optim.learning_rate: must be positive, got {config.optim.learning_rate}")
    data.validate(config)
    return cfg


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit.

    Ctrl-C raises KeyboardInterrupt as usual and is also remembered: a KeyboardInterrupt raised
    inside a callback from compiled code can be swallowed there, and the loop raises it again.

    With several processes the flag of one is not enough: all must save the same step (a
    checkpoint is one collective save). should_stop() reduces the flags over the processes
    every check_every steps (a small all-gather, the only host sync it adds), so every process
    stops at the first such step after any of them received SIGTERM.
    """

    def __init__(self, check_every: int = 1):
        self.requested = False
        self.interrupted = False
        self.check_every = check_every
        self._previous = None
        self._previous_int = None

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step`; called by all processes at every step."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        stop = distributed.any_process(self.requested)
        if stop and not self.requested:
            logging.warning("Another process received SIGTERM: saving a checkpoint and stopping.")
        return stop

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_int = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum, frame):
        self.interrupted = True
        signal.default_int_handler(signum, frame)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        signal.signal(signal.SIGINT, self._previous_int)


# The process's exit status after SIGTERM: "preempted, resume me" (EX_TEMPFAIL), not success.
PREEMPTED_EXIT_CODE = 75


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
    if config.train.get("peak_flops_per_device", 0):
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


def _check_finite(rows: list[dict], workdir: str, ckpt: checkpoint.Checkpointer) -> None:
    for row in rows:
        if not np.isfinite(row["train/loss"]):
            raise _non_finite(f"train/loss is {row['train/loss']}", row["step"], workdir, ckpt)


@dataclasses.dataclass
class Trainer:
    """The compiled pieces of one trial on one mesh: state layout, train and eval steps."""
    model: Transformer
    mesh: jax.sharding.Mesh
    state_shardings: Any
    abstract_state: Any            # ShapeDtypeStructs with shardings, for restoring
    spectra_fn: Any                # params -> weight spectra (None when diagnostics are off)
    spectra_specs: tuple           # the diagnostics.Matrix of each analysed matrix (() when off)
    init_state: Any                # rng -> TrainState, placed on the mesh
    train_step: Any                # (state, batch) -> (state, metrics); donates state
    eval_step: Any                 # (params, batch) -> loss
    plain_step: Any = None         # the same step without the spectra cond, for the steps
                                   # between spectra steps (None when diagnostics are off)
    every: int = 0                 # spectra cadence in steps (0 = off)
    step_fn: Any = None            # the un-jitted train step (train_step with this trial's
                                   # settings bound; `every` may be overridden), for benchmarks

    def step_for(self, step: int):
        """The jitted step to run on a state at `step`: the one with the spectra `lax.cond` on
        spectra steps, the plain one between them. On a GPU a conditional copies its predicate
        to the host and drains the stream once per step (+1.1-1.6% of a 130M step on an H100,
        BENCHMARKS.md); choosing on the host, which counts steps anyway, costs nothing."""
        if self.plain_step is None or step % self.every == 0:
            return self.train_step
        return self.plain_step


def check_batch_split(config: ml_collections.ConfigDict, mesh) -> int:
    """The devices the batch is split over (data x fsdp); raises unless they divide it."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.global_batch_size % batch_devices:
        raise ConfigError(f"config.data.global_batch_size: {config.data.global_batch_size} rows do "
                          f"not split over the {batch_devices} devices of the mesh's data x fsdp "
                          "axes; make it a multiple of them")
    return batch_devices


def make_trainer(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh) -> Trainer:
    model = Transformer(cfg)
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config.optim, config.train.num_steps)

    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))

    spectra_fn, specs, every = None, (), config.diagnostics.every
    if every > 0:
        specs = diagnostics.configured_matrices(cfg, config.diagnostics)
        spectra_fn = functools.partial(diagnostics.weight_spectra, cfg=cfg, specs=specs)

    micro = int(config.train.get("microbatch_size", 0))
    batch_devices = check_batch_split(config, mesh)
    if 0 < micro < config.data.global_batch_size and micro % batch_devices:
        raise ConfigError(f"config.train.microbatch_size: {micro} rows do not split over the "
                          f"{batch_devices} devices of the mesh's data x fsdp axes")
    loss = dict(loss_chunk_tokens=int(config.train.get("loss_chunk_tokens", 0)),
                loss_one_pass=bool(config.train.get("loss_one_pass", False)))

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.meta.unbox(boxed), state_shardings)
    step_fn = functools.partial(
        train_step, model=model, optimizer=optimizer, schedule=schedule, spectra_fn=spectra_fn,
        every=every, microbatch_size=micro, **loss,
        microbatch_sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))))
    # The state is donated (updated in place); metrics stay on the device until fetched.
    jit_step = functools.partial(
        jax.jit, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    return Trainer(
        model=model, mesh=mesh, state_shardings=state_shardings, abstract_state=abstract_state,
        spectra_fn=spectra_fn, spectra_specs=specs,
        init_state=jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings),
        train_step=jit_step(step_fn),
        plain_step=jit_step(functools.partial(step_fn, spectra_fn=None)) if spectra_fn else None,
        every=every,
        eval_step=jax.jit(functools.partial(eval_step, model=model, **loss)),
        step_fn=step_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, overrides: dict | None = None,
                       allow_config_change: bool = False) -> TrialResult:
    """Trains one trial in `workdir`, resuming from its newest checkpoint that restores.

    The workdir is held for the run (workdir.claim): a second job in it, or a resume under a
    config that trains something else, is refused. `overrides` are the trial's swept values,
    shown in the HParams table.
    """
    cfg = validate_config(config)
    workdir_path = epath.Path(workdir)
    with workdir_lib.claim(workdir_path, config, allow_config_change) as changed, \
            contextlib.ExitStack() as cleanup:
        result = _train(config, cfg, workdir_path, overrides or {}, changed, cleanup)
    # Here the saves in flight have finished (cleanup closed the checkpointer): the last
    # checkpoint is complete.
    if result.status == "finished":
        logging.info("Trial finished at step %d: %s", result.step, json.dumps(result.metrics))
    else:
        logging.warning("Stopped at step %d after SIGTERM; the run resumes from there.", result.step)
    return result


def _train(config, cfg, workdir_path, overrides, changed, cleanup: contextlib.ExitStack) -> TrialResult:
    """The trial; what it opens is closed by `cleanup` however it ends (an open data iterator's
    threads would keep the process alive after an error or Ctrl-C)."""
    workdir = str(workdir_path)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_split(config, mesh)
    num_steps = config.train.num_steps
    tokens_per_step = config.data.global_batch_size * config.data.seq_len

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

    writer = summaries.SummaryWriter(str(workdir_path))
    cleanup.callback(writer.close)
    if start_step == 0:
        writer.config(config)
    if jax.process_index() == 0:   # config.json: what `mla_rmt.analyze` rebuilds the model from
        workdir_lib.record_config(workdir_path, config, start_step, changed)

    peak = _peak_flops(config)
    flops_token = flops_per_token(cfg, config.data.seq_len)

    def evaluate(step):
        loss = float(np.mean([trainer.eval_step(state.params, b) for b in eval_batches]))
        values = {"eval/loss": loss, "eval/perplexity": float(np.exp(loss))}
        writer.scalars(step, values)
        logging.info("step %d | eval loss %.4f | perplexity %.2f", step, loss, values["eval/perplexity"])
        return values

    pending: list[tuple[int, dict]] = []   # device metrics not yet fetched
    pending_spectra: list[tuple[int, dict]] = []
    last_spectra: dict[str, float] = {}
    probe_every = config.diagnostics.activations_every or config.diagnostics.every
    probe_tokens = eval_batches[0]["inputs"][: config.diagnostics.probe_batch]
    probe_fn = jax.jit(functools.partial(activations.probe, cfg))

    spectra_specs = {m.name: m for m in trainer.spectra_specs}
    spectra_history: dict[str, dict[str, list]] = {}   # matrix -> steps and [L] values per step
    images_every = config.diagnostics.get("images_every", 0) or config.diagnostics.every or 1

    def write_spectra(params_step, spectra):
        nonlocal last_spectra
        last_spectra = diagnostics.layer_scalars(spectra)
        writer.scalars(params_step, last_spectra)
        for name, values in spectra.items():
            for layer, eigs in enumerate(values["eigenvalues"]):
                writer.histogram(params_step, f"spectral/{name}/eigenvalues/layer_{layer:02d}", eigs)
            history = spectra_history.setdefault(name, {"steps": [], "mp_gap": [], "outlier_energy": []})
            history["steps"].append(params_step)
            for metric in ("mp_gap", "outlier_energy"):
                v = np.asarray(values[metric], np.float64)
                history[metric].append(v.reshape(v.shape[0], -1).mean(axis=1))  # head_mean of per-head ones
        if not writer.enabled or params_step % images_every:
            return
        heatmaps = {f"spectral/{name}/{metric}_heatmap": (
            np.stack(history[metric], axis=1), list(history["steps"]), f"{name}: {metric}", metric)
            for name, history in spectra_history.items() for metric in ("mp_gap", "outlier_energy")}

        def render():   # on the writer's thread; per-head ESDs pool the layer's heads
            images = {}
            for name, values in spectra.items():
                spec = spectra_specs[name]
                for layer, eigs in enumerate(values["eigenvalues"]):
                    fig = plots.esd_figure(eigs, spec.null, values["lambda_plus"][layer],
                                           f"{name} layer {layer}, step {params_step}", gammas=spec.gammas)
                    images[f"spectral/{name}/esd/layer_{layer:02d}"] = plots.figure_to_image(fig)
            for tag, args in heatmaps.items():
                images[tag] = plots.figure_to_image(plots.layer_step_heatmap(*args))
            return images

        writer.images_later(params_step, render)

    def write_activations(step):
        stats = jax.device_get(probe_fn(state.params, probe_tokens))
        writer.scalars(step, {f"activations/{metric}/layer_{layer:02d}": float(v)
                              for metric, per_layer in stats.items() for layer, v in enumerate(per_layer)})

    last_eval: dict[str, float] = {}
    last_train: dict[str, float] = {}
    window_start, window_steps = None, 0

    def flush_metrics(step):
        nonlocal window_start, window_steps, last_train
        rows = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        for params_step, spectra in pending_spectra:     # spectra of the params after params_step
            write_spectra(params_step, jax.device_get(spectra))
        pending_spectra.clear()
        _check_finite(rows, workdir, ckpt)
        ckpt.check_for_errors()        # a failed async save is reported now, naming the directory
        for row in rows:
            writer.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
        if not rows:
            return
        last_train = rows[-1]
        now = time.perf_counter()
        if window_start is not None and window_steps:
            seconds = (now - window_start) / window_steps
            tokens_per_sec = tokens_per_step / seconds
            perf = {"perf/tokens_per_sec": tokens_per_sec, "perf/step_time_sec": seconds}
            if peak:
                perf["perf/mfu"] = tokens_per_sec * flops_token / (peak * jax.device_count())
            writer.scalars(step, perf)
            logging.info("step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %s tok/s | ETA %s",
                         step, num_steps, rows[-1]["train/loss"], rows[-1]["train/learning_rate"],
                         rows[-1]["train/grad_norm"], f"{tokens_per_sec:,.0f}",
                         _format_seconds(seconds * (num_steps - step)))
        window_start, window_steps = now, 0

    def final_metrics():
        return {**{k: v for k, v in last_train.items() if k != "step"}, **last_eval, **last_spectra}

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
            if preemption.interrupted:     # a Ctrl-C that something below swallowed
                raise KeyboardInterrupt("Ctrl-C during training")
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = trainer.step_for(step)(state, batch)
            step += 1
            window_steps += 1
            spectra = metrics.pop("spectra", None)
            if spectra is not None and (step - 1) % config.diagnostics.every == 0:
                pending_spectra.append((step - 1, spectra))
            pending.append((step, metrics))
            if probe_every and step % probe_every == 0:
                write_activations(step)
            if step == start_step + 1:     # the first step includes compilation
                jax.block_until_ready(metrics)
                logging.info("First step (with compilation) took %.1fs", time.perf_counter() - loop_start)
                flush_metrics(step)
            if step % config.train.log_every == 0 or step == num_steps:
                flush_metrics(step)
            if step % config.train.eval_every == 0 or step == num_steps:
                last_eval = evaluate(step)
            stop = preemption.should_stop(step) and step < num_steps
            if step % config.train.checkpoint_every == 0 or step == num_steps or stop:
                flush_metrics(step)        # never checkpoint a state with a non-finite loss
                if not _all_finite(state.params):
                    raise _non_finite("the parameters are not finite", step, workdir, ckpt)
                if step == num_steps or stop:   # the record of the run precedes its checkpoint
                    status = "finished" if step == num_steps else "preempted"
                    write_result(step, status)
                    result_written = True
                writer.flush()             # every scalar so far is on disk before the commit
                ckpt.save(step, state, train_iter, force=True)
            if stop:
                break
        if not result_written:             # resumed from the final checkpoint: nothing ran
            if not last_eval:
                last_eval = evaluate(step)
            write_result(step, status)
    return TrialResult(status=status, step=step, metrics=final_metrics())
