"""The LLaMA model, its presets, the optimizer schedule and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mla_rmt import presets, train
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
    params = model.init(jax.random.key(0), tokens)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, cfg.vocab_size, (2, 7))
    logits2 = model.apply({"params": params}, changed)
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


def _tiny_state(config, batch_rows=8, seq=16, dtype="float32"):
    config.model.dtype = dtype
    config.optim.warmup_steps = 1
    cfg = ModelConfig.from_config(config.model)
    model, optimizer = Transformer(cfg), train.make_optimizer(config)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, (batch_rows, seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))
    return model, optimizer, state, batch


def test_train_step_lowers_loss_on_a_fixed_batch():
    config = presets.base_config()
    model, optimizer, state, batch = _tiny_state(config, batch_rows=4, dtype=config.model.dtype)
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


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel())


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_tokens, one_pass", [(16, False), (24, True), (10**6, False)])
def test_chunked_cross_entropy_matches_plain_loss_and_grads(dtype, tol, chunk_tokens, one_pass):
    rng = np.random.default_rng()
    b, t, d, v = 3, 16, 24, 97
    x_BxTxD = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    head_DxV = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)
    targets_BxT = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def plain(x, w):
        return train.cross_entropy(x @ w.astype(dtype), targets_BxT)

    def chunked(x, w):
        return train.chunked_cross_entropy(x, w, targets_BxT, chunk_tokens, one_pass)

    assert train.loss_chunks(b, t, chunk_tokens) == {16: 4, 24: 2, 10**6: 1}[chunk_tokens]
    loss, (gx, gw) = jax.value_and_grad(chunked, argnums=(0, 1))(x_BxTxD, head_DxV)
    ref_loss, (ref_gx, ref_gw) = jax.value_and_grad(plain, argnums=(0, 1))(x_BxTxD, head_DxV)
    assert gx.dtype == dtype and gw.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol / 10)
    np.testing.assert_allclose(float(jax.jit(chunked)(x_BxTxD, head_DxV)), float(loss), rtol=1e-6)
    assert _relative_error(gx, ref_gx) < tol
    assert _relative_error(gw, ref_gw) < tol


@pytest.mark.parametrize("scale", [1.0, 30.0, 3e4])
def test_one_pass_logsumexp_matches_float64(scale):
    rng = np.random.default_rng()
    logits = rng.normal(size=(5, 7, 301)) * scale + rng.normal(size=(5, 7, 1)) * scale
    logits[0, 0, :-1] = -np.inf                    # one finite entry in a row
    logits[1, 2, 5] = -np.inf
    x64 = logits.max(axis=-1, keepdims=True)
    ref = (x64 + np.log(np.exp(logits - x64).sum(axis=-1, keepdims=True)))[..., 0]
    got = jax.jit(train.logsumexp_one_pass)(jnp.asarray(logits, jnp.float32))
    assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-6, atol=2e-6 * scale)
    bf16 = jnp.asarray(logits, jnp.bfloat16)       # widened inside the reduction
    ref_bf16 = jax.nn.logsumexp(bf16.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(train.logsumexp_one_pass(bf16), ref_bf16, rtol=2e-6, atol=2e-6 * scale)


def test_loss_chunks_divide_the_sequence_and_respect_the_budget():
    assert train.loss_chunks(128, 256, 8192) == 4          # 4 chunks of 128 x 64 tokens
    assert train.loss_chunks(16, 128, 8192) == 1
    assert train.loss_chunks(4, 6, 8) == 3                  # 3 chunks of 4 x 2
    assert train.loss_chunks(100, 8, 10) == 8               # never below one position per chunk


@pytest.mark.parametrize("kind, one_pass", [("mha", False), ("mla_decoupled", True)])
def test_chunked_loss_through_the_model_matches_plain(kind, one_pass):
    config = presets.base_config()
    config.model.attention.kind, config.model.attention.rope_fraction = kind, 0.5
    model, _, state, batch = _tiny_state(config)
    grad = jax.jit(jax.value_and_grad(lambda p, chunk: train.batch_loss(
        p, batch, model=model, loss_chunk_tokens=chunk, loss_one_pass=one_pass)), static_argnums=1)
    ref_loss, ref_grads = grad(state.params, 0)
    loss, grads = grad(state.params, 32)                   # 4 chunks of 8 rows x 4 positions
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        assert _relative_error(g, ref) < 1e-5, jax.tree_util.keystr(path)


# dtype: (loss rtol, grad-norm rtol, {optimizer: relative error of the parameter change})
# fp32 adamw: typically 1e-4 - 4e-4 over fresh random batches, with a tail past 1e-3.
STEP_TOLERANCES = {"float32": (1e-6, 1e-5, {"sgd": 1e-4, "adamw": 5e-3}),
                   "bfloat16": (1e-3, 2e-3, {"sgd": 3e-2, "adamw": 0.15})}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_microbatched_step_equals_the_whole_batch_step(dtype, optimizer_name):
    loss_tol, norm_tol, change_tol = STEP_TOLERANCES[dtype]
    config = presets.base_config()
    model, optimizer, state, batch = _tiny_state(config, dtype=dtype)
    if optimizer_name == "sgd":        # params move by -lr * grads: compares the gradients
        optimizer = optax.sgd(0.1)
        state = state.replace(opt_state=optimizer.init(state.params))
    schedule = train.learning_rate_schedule(config.optim, 600)

    def run(micro):
        step = jax.jit(lambda s, b: train.train_step(
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
    micro = train.microbatches(batch, 2)["inputs"]
    assert micro.shape == (4, 2, 3)
    assert [list(m[:, 0]) for m in np.asarray(micro)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("field, value", [("microbatch_size", 5), ("microbatch_size", -1),
                                          ("loss_chunk_tokens", -2)])
def test_train_step_settings_errors_name_the_field(field, value):
    config = presets.base_config()
    config.data.global_batch_size = 32
    config.train[field] = value
    with pytest.raises(ConfigError, match=f"config.train.{field}"):
        train.validate_config(config)
