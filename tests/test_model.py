"""The LLaMA model, its presets and ModelConfig's checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params

from mla_rmt import presets
from mla_rmt.model import SwiGLU, Transformer, flops_per_token, param_count
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
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    logits = forward(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, cfg.vocab_size, (2, 7))
    logits2 = forward(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :9]), np.asarray(logits2[:, :9]))
    assert not np.allclose(np.asarray(logits[:, 9:]), np.asarray(logits2[:, 9:]))

def test_swiglu_and_its_input_gradient_match_float64():
    """The fused (d, 2, f) gate/up weight computes silu(x W_gate) * (x W_up) W_down."""
    cfg = _cfg(dtype="float32")
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 5, cfg.d_model))
    dy = rng.standard_normal((2, 5, cfg.d_model))
    mlp = SwiGLU(cfg)
    params = mlp.init(jax.random.key(int(rng.integers(1 << 30))), jnp.zeros((1, 1, cfg.d_model)))
    y, vjp = jax.vjp(lambda x: mlp.apply(params, x), jnp.asarray(x, jnp.float32))
    (dx,) = vjp(jnp.asarray(dy, jnp.float32))
    p = jax.tree.map(lambda w: np.asarray(w.unbox() if hasattr(w, "unbox") else w, np.float64),
                     params["params"], is_leaf=lambda w: hasattr(w, "unbox"))
    w_gate, w_up, w_down = p["w_gate_up"][:, 0], p["w_gate_up"][:, 1], p["w_down"]
    g, u = x @ w_gate, x @ w_up
    sig = 1 / (1 + np.exp(-g))
    np.testing.assert_allclose(np.asarray(y), (g * sig * u) @ w_down, rtol=1e-4, atol=1e-4)
    dh = dy @ w_down.T
    dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
    np.testing.assert_allclose(np.asarray(dx), dg @ w_gate.T + du @ w_up.T, rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("kind", ["mha", "mla_decoupled"])
def test_a_rolled_layer_scan_inits_and_computes_what_the_unrolled_one_does(rng, kind):
    """The tests' short trials roll the layer scan (conftest.FAST_OVERRIDES: it compiles in about
    two thirds of the time): the same init, and the same logits and gradients to float32 rounding."""
    tokens = rng.integers(0, 2048, (2, 16)).astype(np.int32)
    weights = jnp.asarray(rng.standard_normal((2, 16, 2048)), jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    results = []
    for unroll in (0, 1):                       # 0: all four layers unrolled (the default), 1: rolled
        model = Transformer(_cfg(dtype="float32", scan_unroll=unroll, attention={"kind": kind}))
        assert model.cfg.kind == kind and model.cfg.scan_unroll == (unroll or 4)

        def loss(p, model=model):
            logits = model.apply({"params": p}, tokens)
            return jnp.sum(logits * weights), logits
        params = init_params(model, key, tokens)
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append(jax.tree.map(np.asarray, (params, logits, grads)))
    (params, logits, grads), (got_params, got_logits, got_grads) = results
    jax.tree.map(np.testing.assert_array_equal, got_params, params)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

def test_bf16_compute_with_fp32_params():
    cfg = _cfg()
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = init_params(model, jax.random.key(1), tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert jax.eval_shape(model.apply, {"params": params}, tokens).dtype == jnp.bfloat16

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


def test_model_fields_are_declared_once_in_model_config():
    """presets' config.model is built from ModelConfig's fields, and from_config reads each back."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    model = presets.base_config().model
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(model.keys()) - {"attention", "preset"} | set(model.attention.keys()) == set(fields)
    config = presets.base_config()
    config.model.update(rope_theta=500.0, scan_unroll=2)
    config.model.attention.update(kind="gqa", num_kv_heads=2, remove_gap=True, remove_gap_mode="scaled")
    cfg = ModelConfig.from_config(config.model)
    assert (cfg.rope_theta, cfg.scan_unroll, cfg.kind, cfg.num_kv_heads, cfg.remove_gap,
            cfg.remove_gap_mode) == (500.0, 2, "gqa", 2, True, "scaled")
    defaults = ModelConfig.from_config(presets.base_config().model)   # zeros stand for defaults
    assert (defaults.scan_unroll, defaults.num_kv_heads, defaults.kv_latent_dim) == (4, 4, 64)
