"""The train state, the train and eval steps, and the Trainer: the compiled pieces of one trial.

A trial runs two jitted train steps: the plain one, and on spectra steps the same step that also
returns the weight spectra of the incoming params (docs/spectral.md). The host, which counts
steps anyway, picks between them (Trainer.step_for), so no step carries a conditional.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mla_rmt import config_check, diagnostics, loss as loss_lib, optimizer as optimizer_lib, sharding, tags
from mla_rmt.model import Transformer
from mla_rmt.model_config import ModelConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def microbatches(batch, microbatch_size: int):
    """{k: [B, ...]} -> {k: [B / m, m, ...]}: microbatch i holds rows i, i + B/m, i + 2B/m, ...

    Strided rather than contiguous, so that with the batch split in blocks over the devices
    every microbatch is spread evenly over them (each device keeps computing on its own rows).
    """
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(microbatch_size, b // microbatch_size, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, optimizer, schedule, spectra_fn=None,
               microbatch_size: int = 0, loss_chunk_tokens: int = 0, loss_one_pass: bool = False,
               microbatch_sharding=None):
    """One optimizer step; with spectra_fn, also the weight spectra of the incoming params
    (metrics["spectra"]).

    With 0 < microbatch_size < batch rows (a divisor of them: config_check.validate), the
    gradients of B / microbatch_size microbatches are summed in fp32 under lax.scan and
    averaged, then one update is applied: the same step as on the whole batch (to rounding),
    with the activations of one microbatch alive at once.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_lib.batch_loss, model=model,
                                                   loss_chunk_tokens=loss_chunk_tokens,
                                                   loss_one_pass=loss_one_pass))
    rows = batch["inputs"].shape[0]
    if 0 < microbatch_size < rows:
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
    metrics = {tags.TRAIN_LOSS: loss, tags.TRAIN_GRAD_NORM: optax.global_norm(grads),
               tags.TRAIN_LEARNING_RATE: schedule(state.step)}
    if spectra_fn is not None:
        # The spectra of the incoming params, ordered after the update by the barrier so they
        # do not delay the update's launches. Only the attention weights are kept past the
        # in-place update (all the spectra read).
        attention_params, _ = jax.lax.optimization_barrier(
            (state.params["layers"]["attention"], params))
        metrics["spectra"] = spectra_fn({"layers": {"attention": attention_params}})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model, loss_chunk_tokens: int = 0, loss_one_pass: bool = False):
    return loss_lib.batch_loss(params, batch, model=model, loss_chunk_tokens=loss_chunk_tokens,
                               loss_one_pass=loss_one_pass)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled pieces of one trial on one mesh: state layout, train and eval steps."""
    state_shardings: Any
    abstract_state: Any            # ShapeDtypeStructs with shardings, for restoring
    init_state: Any                # rng -> TrainState, placed on the mesh
    train_step: Any                # (state, batch) -> (state, metrics); donates state
    eval_step: Any                 # (params, batch) -> loss
    spectra_step: Any = None       # train_step that also returns metrics["spectra"] (None: off)
    spectra_specs: tuple = ()      # the diagnostics.Matrix of each analysed matrix (() when off)
    every: int = 0                 # spectra cadence in steps (0 = off)

    def step_for(self, step: int):
        """The jitted step to run on a state at `step`: the spectra step every `every` steps,
        the plain one between them."""
        if self.spectra_step is not None and step % self.every == 0:
            return self.spectra_step
        return self.train_step


def make_trainer(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh) -> Trainer:
    """The Trainer of a validated config (config_check.validate) on `mesh`."""
    config_check.check_mesh(config, mesh)
    model = Transformer(cfg)
    optimizer = optimizer_lib.make_optimizer(config)
    schedule = optimizer_lib.learning_rate_schedule(config.optim, config.train.num_steps)

    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))

    loss = dict(loss_chunk_tokens=config.train.loss_chunk_tokens,
                loss_one_pass=config.train.loss_one_pass)
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.meta.unbox(boxed), state_shardings)
    step_fn = functools.partial(
        train_step, model=model, optimizer=optimizer, schedule=schedule,
        microbatch_size=config.train.microbatch_size, **loss,
        microbatch_sharding=sharding.batch_sharding(mesh, leading=1))
    # The state is donated (updated in place); metrics stay on the device until fetched.
    jit_step = functools.partial(
        jax.jit, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    spectra_step, specs, every = None, (), config.diagnostics.every
    if every > 0:
        specs = diagnostics.configured_matrices(cfg, config.diagnostics)
        spectra_fn = functools.partial(diagnostics.weight_spectra, cfg=cfg, specs=specs)
        spectra_step = jit_step(functools.partial(step_fn, spectra_fn=spectra_fn))
    return Trainer(
        state_shardings=state_shardings, abstract_state=abstract_state,
        init_state=jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings),
        train_step=jit_step(step_fn),
        eval_step=jax.jit(functools.partial(eval_step, model=model, **loss)),
        spectra_step=spectra_step, spectra_specs=specs, every=every)
