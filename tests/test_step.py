"""mla_rmt/step.py: the train step, microbatching, and the Trainer's two steps."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_params

from mla_rmt import (config_check, diagnostics, loss as loss_lib, optimizer as optimizer_lib, presets, sharding,
                     step as step_lib)
from mla_rmt.model import Transformer
from mla_rmt.model_config import ModelConfig


def _tiny_state(config, batch_rows=8, seq=16, dtype="float32"):
    """The tiny model's state; its layers under a rolled scan, which compiles faster and computes
    the same (tests/test_model.py)."""
    config.model.dtype = dtype
    config.model.scan_unroll = 1
    config.optim.warmup_steps = 1
    cfg = ModelConfig.from_config(config.model)
    model, optimizer = Transformer(cfg), optimizer_lib.make_optimizer(config)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (batch_rows, seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = init_params(model, jax.random.key(0), batch["inputs"])
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))
    return model, optimizer, state, batch

def test_train_step_lowers_loss_on_a_fixed_batch():
    config = presets.base_config()
    model, optimizer, state, batch = _tiny_state(config, batch_rows=4, dtype=config.model.dtype)
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, optimizer=optimizer,
                                                 schedule=optimizer_lib.learning_rate_schedule(config.optim, 600)))
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0] - 1.0
    assert int(state.step) == 10
    assert np.isfinite(float(metrics["train/grad_norm"]))
    ref = optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": state.params}, batch["inputs"]).astype(jnp.float32), batch["targets"]).mean()
    assert abs(float(ref) - float(loss_lib.cross_entropy(model.apply({"params": state.params},
                                                                   batch["inputs"]), batch["targets"]))) < 1e-6

def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel())

# dtype: (loss rtol, grad-norm rtol, {optimizer: relative error of the parameter change})
# fp32 adamw: typically 1e-4 - 4e-4 over fresh random batches, with a tail past 1e-3. bf16
# adamw, the worst leaf (a norm's scales, mostly): median 0.056, 90th percentile 0.08, largest
# 0.151 over 40 fresh batches.
STEP_TOLERANCES = {"float32": (1e-6, 1e-5, {"sgd": 1e-4, "adamw": 5e-3}),
                   "bfloat16": (1e-3, 2e-3, {"sgd": 3e-2, "adamw": 0.3})}

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_microbatched_step_equals_the_whole_batch_step(dtype, optimizer_name):
    loss_tol, norm_tol, change_tol = STEP_TOLERANCES[dtype]
    config = presets.base_config()
    model, optimizer, state, batch = _tiny_state(config, dtype=dtype)
    if optimizer_name == "sgd":        # params move by -lr * grads: compares the gradients
        optimizer = optax.sgd(0.1)
        state = state.replace(opt_state=optimizer.init(state.params))
    schedule = optimizer_lib.learning_rate_schedule(config.optim, 600)

    def run(micro):
        step = jax.jit(lambda s, b: step_lib.train_step(
            s, b, model=model, optimizer=optimizer, schedule=schedule, microbatch_size=micro,
            loss_chunk_tokens=64))
        s, losses, norms = state, [], []
        for _ in range(3):
            s, metrics = step(s, batch)
            losses.append(float(metrics["train/loss"]))
            norms.append(float(metrics["train/grad_norm"]))
        return s, losses, norms

    s0, losses0, norms0 = run(0)
    s2, losses2, norms2 = run(2)      # 4 microbatches of 2 rows
    assert int(s2.step) == 3 and losses0[-1] < losses0[0]
    np.testing.assert_allclose(losses2, losses0, rtol=loss_tol)
    np.testing.assert_allclose(norms2, norms0, rtol=norm_tol)
    # The change of every parameter over the 3 steps. Adam divides by sqrt(v): where a gradient
    # is ~0, rounding-level differences flip the sign of that entry's update, so its tolerance
    # is looser than SGD's.
    worst = max(_relative_error(np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p))
                for a, b, p in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s0.params),
                                   jax.tree.leaves(state.params)))
    assert worst < change_tol[optimizer_name], worst

def test_microbatches_are_strided_rows():
    batch = {"inputs": np.arange(8)[:, None] * np.ones((1, 3), int)}
    micro = step_lib.microbatches(batch, 2)["inputs"]
    assert micro.shape == (4, 2, 3)
    assert [list(m[:, 0]) for m in np.asarray(micro)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _trainer(every, dtype="bfloat16"):
    config = presets.base_config()
    config.model.dtype = dtype
    config.model.attention.kind, config.model.attention.rope_fraction = "mla_decoupled", 0.5
    config.data.seq_len, config.data.global_batch_size = 16, 4
    config.diagnostics.every = every
    config.model.scan_unroll = 1              # compiles faster (see _tiny_state)
    cfg = config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
    return cfg, step_lib.make_trainer(config, cfg, mesh), batch


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_spectra_step_is_the_plain_step_plus_the_spectra_of_the_incoming_params(dtype):
    """The same update, bit for bit with the default bfloat16 compute. With float32 compute,
    under the suite's -O0, XLA rounds the two programs' gradients differently, so the optimizer
    moments agree to float32 rounding only (docs/spectral.md, "The spectra step")."""
    cfg, trainer, batch = _trainer(every=3, dtype=dtype)
    assert [trainer.step_for(s) is trainer.spectra_step for s in range(7)] == [
        True, False, False, True, False, False, True]
    incoming = trainer.init_state(jax.random.key(0))
    expected = jax.device_get(jax.jit(functools.partial(
        diagnostics.weight_spectra, cfg=cfg, specs=trainer.spectra_specs))(incoming.params))
    plain_state, plain = trainer.train_step(trainer.init_state(jax.random.key(0)), batch)
    spectra_state, with_spectra = trainer.spectra_step(incoming, batch)
    assert "spectra" not in plain and set(with_spectra) == set(plain) | {"spectra"}
    rel = 0 if dtype == "bfloat16" else 1e-6
    for k in plain:       # the same update: the spectra only read the incoming params
        assert float(plain[k]) == pytest.approx(float(with_spectra[k]), rel=rel, abs=0), k
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(spectra_state)):
        a, b = np.asarray(a), np.asarray(b)
        if dtype == "bfloat16":
            np.testing.assert_array_equal(a, b)
        else:             # to rounding: relative to the tensor's largest entry
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    got = jax.device_get(with_spectra["spectra"])
    assert set(got) == {m.name for m in trainer.spectra_specs} and got
    for name, values in expected.items():
        assert _relative_error(got[name]["eigenvalues"], values["eigenvalues"]) < 1e-5, name


def test_without_diagnostics_every_step_is_the_plain_step():
    _, trainer, _ = _trainer(every=0)
    assert trainer.spectra_step is None and trainer.spectra_specs == ()
    assert all(trainer.step_for(s) is trainer.train_step for s in range(4))
