"""The LLaMA model, its presets, the optimizer schedule and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mla_rmt import presets, train
from mla_rmt.model import Transformer, flops_per_token, param_count
from mla_rmt.model_config import ConfigError, ModelConfig


def _cfg(preset="tiny", **model):
    config = presets.apply_model_preset(presets.base_config(), preset)
    config.model.update(model)
    return ModelConfig.from_config(config.model)


def test_llama_130m_parameter_count():
    cfg = _cfg("llama_130m")
    d, f, v, layers = 768, 2048, 32000, 12
    per_layer = 4 * d * d + 3 * d * f + 2 * d          # attention, SwiGLU, two norms
    expected = layers * per_layer + 2 * v * d + d       # + embedding, untied head, final norm
    assert param_count(cfg) == expected
    assert 133e6 < expected < 135e6                      # "about 134M with an untied head"


def test_flops_per_token_formula():
    cfg = _cfg("llama_130m")
    matmul = 12 * (4 * 768 * 768 + 3 * 768 * 2048) + 768 * 32000
    assert flops_per_token(cfg, 256) == 6 * matmul + 12 * 12 * 256 * 768


def test_forward_shapes_dtypes_and_causality():
    cfg = _cfg(dtype="float32")
    model = Transformer(cfg)
    rng = np.random.default_rng()
    tokens = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, cfg.vocab_size, (2, 7))
    logits2 = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :9]), np.asarray(logits2[:, :9]))
    assert not np.allclose(np.asarray(logits[:, 9:]), np.asarray(logits2[:, 9:]))


def test_bf16_compute_with_fp32_params():
    cfg = _cfg()
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(1), tokens)["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert model.apply({"params": params}, tokens).dtype == jnp.bfloat16


def test_learning_rate_schedule_warmup_then_cosine():
    config = presets.base_config()
    o = config.optim
    o.learning_rate, o.warmup_steps, o.min_lr_ratio = 1e-3, 10, 0.1
    schedule = train.learning_rate_schedule(o, 110)
    for step in (0, 5, 10, 60, 110):
        if step <= 10:
            want = 1e-3 * step / 10
        else:
            progress = (step - 10) / 100
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9)


def test_weight_decay_skips_norm_scales():
    config = presets.base_config()
    cfg = ModelConfig.from_config(config.model)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mask = train._decay_mask(params)  # pylint: disable=protected-access
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert not any(v for k, v in flat.items() if "scale" in k)
    assert all(v for k, v in flat.items() if "w_q" in k or "lm_head" in k or "embed']" in k)


def test_train_step_lowers_loss_on_a_fixed_batch():
    config = presets.base_config()
    config.optim.warmup_steps = 1
    cfg = ModelConfig.from_config(config.model)
    model, optimizer = Transformer(cfg), train.make_optimizer(config)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))
    step = jax.jit(lambda s, b: train.train_step(s, b, model=model, optimizer=optimizer,
                                                 schedule=train.learning_rate_schedule(config.optim, 600)))
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0] - 1.0
    assert int(state.step) == 10
    assert np.isfinite(float(metrics["train/grad_norm"]))
    ref = optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": state.params}, batch["inputs"]).astype(jnp.float32), batch["targets"]).mean()
    assert abs(float(ref) - float(train.cross_entropy(model.apply({"params": state.params},
                                                                   batch["inputs"]), batch["targets"]))) < 1e-6


@pytest.mark.parametrize("field, value, name", [
    ("d_model", 130, "config.model.d_model"),
    ("num_heads", 0, "config.model.num_heads"),
    ("dtype", "float8", "config.model.dtype"),
])
def test_model_config_errors_name_the_field(field, value, name):
    config = presets.base_config()
    config.model[field] = value
    with pytest.raises(ConfigError, match=name):
        ModelConfig.from_config(config.model)


def test_train_config_errors_name_the_field():
    config = presets.base_config()
    config.train.num_steps = 0
    with pytest.raises(ConfigError, match="config.train.num_steps"):
        train.validate_config(config)
