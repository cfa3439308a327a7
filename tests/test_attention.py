"""Attention kinds: causality, numpy references, rotary, remove_gap, config checks, accounting."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_rmt import attention, presets, rope
from mla_rmt.model_config import ConfigError, ModelConfig

KINDS = ("mha", "gqa", "mla_prerope", "mla_decoupled")
B, T = 2, 12


def make_cfg(kind="mha", preset=None, dtype="float32", impl="xla", **attn) -> ModelConfig:
    """A small float32 config on the 'xla' kernel (d_model 32, 4 heads of 16), or a preset's."""
    config = presets.base_config()
    if preset:
        presets.apply_model_preset(config, preset)
    else:
        config.model.update(d_model=32, num_heads=4, d_head=16)
        config.model.attention.update(num_kv_heads=2, kv_latent_dim=16)
    config.model.update(dtype=dtype, attention_impl=impl)
    config.model.attention.kind = kind
    config.model.attention.update(attn)
    return ModelConfig.from_config(config.model)


def inputs(rng, cfg, t=T):
    x = rng.standard_normal((B, t, cfg.d_model)).astype(np.float32)
    positions = np.arange(t)[None, :] + rng.integers(0, 50, (B, 1))
    return jnp.asarray(x, cfg.compute_dtype), jnp.asarray(positions, jnp.int32)


def build(rng, cfg, x, positions):
    module = attention.get(cfg.kind)(cfg)
    variables = module.init(jax.random.key(int(rng.integers(2**31))), x, positions)
    return module, variables


def np_params(variables):
    return {k: np.asarray(v, np.float64) for k, v in nn.unbox(variables["params"]).items()}


# numpy float64 references ----------------------------------------------------------------------
def np_rotate(x_BxTxHxK, positions_BxT, rope_dims, theta):
    """Rotate-half RoPE on dims [0, rope_dims), float64."""
    if rope_dims == 0:
        return x_BxTxHxK
    half = rope_dims // 2
    angle = positions_BxT[..., None, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:rope_dims]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle), x_BxTxHxK[..., rope_dims:]], -1)


def np_qkv(cfg, p, x, positions):
    """Per-kind q, k, v written out in numpy from each kind's definition (the class docstrings
    of mla_rmt/attention.py)."""
    x = np.asarray(x, np.float64)
    pos = np.asarray(positions, np.float64)
    rot = lambda a, r=cfg.rope_dims: np_rotate(a, pos, r, cfg.rope_theta)  # noqa: E731
    up = lambda c, w: np.einsum("btc,chk->bthk", c, w)  # noqa: E731
    if cfg.kind in ("mha", "gqa"):
        return rot(up(x, p["w_q"])), rot(up(x, p["w_k"])), up(x, p["w_v"])
    c_q = x @ p["w_dq"] if cfg.q_latent_dim else x
    c_kv = x @ p["w_dkv"]
    if cfg.kind == "mla_prerope":
        return rot(up(c_q, p["w_uq"])), rot(up(c_kv, p["w_uk"])), up(c_kv, p["w_uv"])
    assert cfg.kind == "mla_decoupled"
    d_r, d_c, h = cfg.rope_dims, cfg.d_head - cfg.rope_dims, cfg.num_heads
    q_r = rot(up(c_q, p["w_qr"])) if d_r else np.zeros((B, x.shape[1], h, 0))
    k_r = rot((x @ p["w_kr"])[:, :, None, :]) if d_r else np.zeros((B, x.shape[1], 1, 0))
    q_c = up(c_q, p["w_uq"]) if d_c else np.zeros((B, x.shape[1], h, 0))
    k_c = up(c_kv, p["w_uk"]) if d_c else np.zeros((B, x.shape[1], h, 0))
    k = np.concatenate([np.repeat(k_r, h, axis=2), k_c], -1)
    return np.concatenate([q_r, q_c], -1), k, up(c_kv, p["w_uv"])


def np_attention(cfg, p, x, positions):
    """Causal softmax attention (A - U with remove_gap) and W_O, float64."""
    q, k, v = np_qkv(cfg, p, x, positions)
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    t = q.shape[1]
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.d_head)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if cfg.remove_gap:
        probs -= np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    return np.einsum("bhts,bshk,hkd->btd", probs, v, p["w_o"])


def assert_close(actual, expected, rtol=1e-5):
    actual = np.asarray(actual, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# causality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("remove_gap", [False, True])
@pytest.mark.parametrize("f", [0.0, 0.5, 1.0])
def test_causal(rng, kind, remove_gap, f):
    """Changing the inputs after position t leaves every output at positions <= t bit-identical."""
    cfg = make_cfg(kind, rope_fraction=f, remove_gap=remove_gap, q_latent_dim=24)
    x, positions = inputs(rng, cfg)
    module, variables = build(rng, cfg, x, positions)
    t = int(rng.integers(1, T - 1))
    x2 = x.at[:, t + 1:].set(rng.standard_normal((B, T - t - 1, cfg.d_model)).astype(np.float32))
    y, y2 = module.apply(variables, x, positions), module.apply(variables, x2, positions)
    assert np.array_equal(y[:, :t + 1], y2[:, :t + 1])
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])  # the change did reach the later outputs


# numpy references ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,attn", [
    ("mha", dict(rope_fraction=0.5)),
    ("mha", dict(rope_fraction=0.25, remove_gap=True)),
    ("gqa", dict(rope_fraction=0.5, num_kv_heads=1)),           # MQA
    ("gqa", dict(rope_fraction=0.5)),                           # 2 kv heads, fused kernel
    ("gqa", dict(rope_fraction=0.5, remove_gap=True)),          # 2 kv heads, explicit core
    ("mla_prerope", dict(rope_fraction=0.5, q_latent_dim=24)),
    ("mla_decoupled", dict(rope_fraction=0.5)),
    ("mla_decoupled", dict(rope_fraction=0.25, q_latent_dim=24, remove_gap=True)),
    ("mla_decoupled", dict(rope_fraction=0.0)),
    ("mla_decoupled", dict(rope_fraction=1.0)),
])
def test_matches_numpy_reference(rng, kind, attn):
    cfg = make_cfg(kind, **attn)
    x, positions = inputs(rng, cfg)
    module, variables = build(rng, cfg, x, positions)
    y = module.apply(variables, x, positions)
    assert y.shape == (B, T, cfg.d_model) and y.dtype == jnp.float32
    assert_close(y, np_attention(cfg, np_params(variables), x, positions))


def test_gqa_with_all_kv_heads_is_mha(rng):
    mha, gqa = make_cfg("mha", rope_fraction=0.5), make_cfg("gqa", rope_fraction=0.5, num_kv_heads=4)
    x, positions = inputs(rng, mha)
    module, variables = build(rng, mha, x, positions)
    gqa_module = attention.get("gqa")(gqa)
    gqa_shapes = jax.tree.map(np.shape, gqa_module.init(jax.random.key(0), x, positions))
    assert gqa_shapes == jax.tree.map(np.shape, variables)
    assert np.array_equal(module.apply(variables, x, positions), gqa_module.apply(variables, x, positions))


def test_mqa_has_one_key_value_head(rng):
    cfg = make_cfg("gqa", num_kv_heads=1)
    x, positions = inputs(rng, cfg)
    _, variables = build(rng, cfg, x, positions)
    p = np_params(variables)
    assert p["w_k"].shape == p["w_v"].shape == (cfg.d_model, 1, cfg.d_head)
    assert p["w_q"].shape == (cfg.d_model, cfg.num_heads, cfg.d_head)


# rotary ----------------------------------------------------------------------------------------
def test_rotate_matches_reference_and_keeps_the_rest(rng):
    x = rng.standard_normal((B, T, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 100, (B, T))
    out = np.asarray(rope.rotate(jnp.asarray(x), jnp.asarray(positions), 6, 10000.0))
    assert_close(out, np_rotate(x.astype(np.float64), positions, 6, 10000.0))
    assert np.array_equal(out[..., 6:], x[..., 6:])


def test_rotate_gradient_is_the_adjoint_of_the_rotation(rng):
    """<rotate(x), g> = <x, vjp(g)> for every x: checked against the float64 reference rotation
    on random x, so the hand-written backward is the transpose of the forward."""
    positions = rng.integers(0, 100, (B, T))
    g = rng.standard_normal((B, T, 3, 16))
    _, vjp = jax.vjp(lambda x: rope.rotate(x, jnp.asarray(positions), 10, 10000.0),
                     jnp.zeros((B, T, 3, 16), jnp.float32))
    (grad,) = vjp(jnp.asarray(g, jnp.float32))
    grad = np.asarray(grad, np.float64)
    for _ in range(3):
        x = rng.standard_normal((B, T, 3, 16))
        lhs = np.sum(np_rotate(x, positions, 10, 10000.0) * g)
        assert abs(lhs - np.sum(x * grad)) < 1e-5 * np.sqrt(x.size)
    assert np.array_equal(grad[..., 10:], g[..., 10:].astype(np.float32))  # unrotated dims


def test_rotary_logits_depend_only_on_relative_position(rng):
    q = jnp.asarray(rng.standard_normal((B, T, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, 3, 16)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 64, (B, T)))
    shift = int(rng.integers(1, 64))

    def logits(q_positions, k_positions):
        qr, kr = rope.rotate(q, q_positions, 16, 10000.0), rope.rotate(k, k_positions, 16, 10000.0)
        return np.einsum("bthk,bshk->bhts", qr, kr)

    base = logits(positions, positions)
    np.testing.assert_allclose(logits(positions + shift, positions + shift), base, atol=1e-5 * 16)
    assert not np.allclose(logits(positions + shift, positions), base, atol=1e-2)  # offsets matter


# mla_decoupled: one rotary key per token -------------------------------------------------------
def captured_qkv(cfg, variables, x, positions):
    module = attention.get(cfg.kind)(cfg)
    _, state = module.apply(variables, x, positions, mutable=["intermediates"],
                            capture_intermediates=lambda _, name: name == "qkv")
    return state["intermediates"]["qkv"][0]


def test_decoupled_rotary_key_is_shared_by_all_heads(rng):
    cfg = make_cfg("mla_decoupled", rope_fraction=0.25, q_latent_dim=24)
    d, h, d_r = cfg.d_model, cfg.num_heads, cfg.rope_dims
    x, positions = inputs(rng, cfg)
    _, variables = build(rng, cfg, x, positions)
    shapes = jax.tree.map(np.shape, np_params(variables))
    assert shapes == {"w_dq": (d, 24), "w_dkv": (d, 16), "w_qr": (24, h, d_r), "w_kr": (d, d_r),
                      "w_uq": (24, h, 16 - d_r), "w_uk": (16, h, 16 - d_r), "w_uv": (16, h, 16),
                      "w_o": (h, 16, d)}
    q, k, v = (np.asarray(a) for a in captured_qkv(cfg, variables, x, positions))
    assert q.shape == k.shape == v.shape == (B, T, h, 16)
    assert np.array_equal(k[..., :d_r], np.broadcast_to(k[:, :, :1, :d_r], k[..., :d_r].shape))
    assert not np.allclose(k[:, :, 0, d_r:], k[:, :, 1, d_r:])   # content keys are per head
    assert not np.allclose(q[:, :, 0, :d_r], q[:, :, 1, :d_r])   # rotary queries are per head


def test_prerope_rotary_keys_are_per_head(rng):
    cfg = make_cfg("mla_prerope", rope_fraction=0.5)
    x, positions = inputs(rng, cfg)
    _, variables = build(rng, cfg, x, positions)
    assert "w_kr" not in variables["params"] and "w_dq" not in variables["params"]
    _, k, _ = captured_qkv(cfg, variables, x, positions)
    assert not np.allclose(k[:, :, 0, :cfg.rope_dims], k[:, :, 1, :cfg.rope_dims])


@pytest.mark.parametrize("f,absent", [(0.0, {"w_qr", "w_kr"}), (1.0, {"w_uq", "w_uk"})])
def test_decoupled_drops_zero_width_pieces(rng, f, absent):
    cfg = make_cfg("mla_decoupled", rope_fraction=f)
    x, positions = inputs(rng, cfg)
    _, variables = build(rng, cfg, x, positions)
    names = set(variables["params"])
    assert not names & absent and len(names) == 7 - len(absent)
    assert all(w.size for w in jax.tree.leaves(variables))


@pytest.mark.parametrize("kind,attn", [("mha", {}), ("gqa", {}), ("mla_prerope", dict(q_latent_dim=24)),
                                       ("mla_decoupled", dict(q_latent_dim=24)), ("mla_decoupled", {})])
def test_qk_maps_give_queries_and_keys_at_offset_zero(rng, kind, attn):
    """qk_maps (what the spectral diagnostics read) reproduce qkv() when every position is 0."""
    cfg = make_cfg(kind, rope_fraction=0.5, **attn)
    x, _ = inputs(rng, cfg)
    zeros = jnp.zeros((B, T), jnp.int32)
    _, variables = build(rng, cfg, x, zeros)
    q, k, _ = captured_qkv(cfg, variables, x, zeros)
    w_q, w_k = attention.get(kind).qk_maps(cfg, variables["params"])
    assert w_q.shape == w_k.shape == (cfg.d_model, cfg.num_heads, cfg.d_head)
    x64 = np.asarray(x, np.float64)
    groups = cfg.num_heads // k.shape[2]
    assert_close(q, np.einsum("btd,dhk->bthk", x64, np.asarray(w_q, np.float64)))
    assert_close(np.repeat(k, groups, axis=2), np.einsum("btd,dhk->bthk", x64, np.asarray(w_k, np.float64)))


# remove_gap ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_remove_gap_centres_attention(rng, kind):
    cfg, plain = make_cfg(kind, remove_gap=True), make_cfg(kind, remove_gap=False)
    x, positions = inputs(rng, cfg)
    module, variables = build(rng, cfg, x, positions)
    y, state = module.apply(variables, x, positions, capture=True, mutable=["intermediates"])
    y_plain, plain_state = attention.get(kind)(plain).apply(variables, x, positions, capture=True,
                                                            mutable=["intermediates"])
    centred = np.asarray(state["intermediates"]["probs_BxHxTxT"][0], np.float64)
    probs = np.asarray(plain_state["intermediates"]["probs_BxHxTxT"][0], np.float64)
    u = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(centred.sum(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(centred, probs - u, atol=1e-7)
    assert np.all(centred[..., 0, :] == 0) and np.all(np.triu(centred, 1) == 0)
    assert np.all(np.asarray(y[:, 0]) == 0) and np.all(np.abs(np.asarray(y_plain[:, 0])) > 0)


# config checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,attn,field", [
    ("mha", dict(rope_fraction=0.0625), "rope_fraction"),         # 1 dim of 16: odd
    ("mla_decoupled", dict(rope_fraction=0.1), "rope_fraction"),  # 1.6 dims: not whole
    ("mha", dict(rope_fraction=1.5), "rope_fraction"),
    ("mla_prerope", dict(rope_fraction=-0.25), "rope_fraction"),
    ("mla_prerope", dict(kv_latent_dim=33), "kv_latent_dim"),
    ("mla_decoupled", dict(kv_latent_dim=-4), "kv_latent_dim"),
    ("mla_prerope", dict(q_latent_dim=64), "q_latent_dim"),
    ("mla_decoupled", dict(q_latent_dim=-1), "q_latent_dim"),
    ("gqa", dict(num_kv_heads=3), "num_kv_heads"),
    ("gqa", dict(num_kv_heads=-2), "num_kv_heads"),
    ("nope_attention", {}, "kind"),
])
def test_bad_config_names_the_field(kind, attn, field):
    with pytest.raises(ConfigError, match=re.escape(f"config.model.attention.{field}")):
        make_cfg(kind, **attn)


def test_edge_configs_are_accepted():
    assert make_cfg("mha", rope_fraction=0.125).rope_dims == 2
    make_cfg("mha", kv_latent_dim=999, q_latent_dim=999)  # the sweep sets them for every kind
    make_cfg("mla_decoupled", kv_latent_dim=32, q_latent_dim=32)  # equal to d_model is allowed


# accounting at the paper's LLaMA-130M ----------------------------------------------------------
D, H, K, L, C = 768, 12, 64, 12, 384  # d_model, heads, d_head, layers, default kv latent d_model/2


@pytest.mark.parametrize("kind,attn,params,kv_elems", [
    ("mha", {}, 4 * D * H * K, 2 * H * K),
    ("gqa", dict(num_kv_heads=4), 2 * D * H * K + 2 * D * 4 * K, 2 * 4 * K),
    ("gqa", dict(num_kv_heads=1), 2 * D * H * K + 2 * D * K, 2 * K),
    ("mla_prerope", {}, D * H * K + D * C + 2 * C * H * K + H * K * D, C),
    ("mla_prerope", dict(q_latent_dim=384), D * 384 + 384 * H * K + D * C + 2 * C * H * K + H * K * D, C),
    # q^R, q^C from x; c_KV; k^C, v from c_KV; one rotary key; W_O.   d_R = 32, d_C = 32
    ("mla_decoupled", {}, D * H * 32 * 2 + D * C + C * H * 32 + C * H * K + D * 32 + H * K * D, C + 32),
    ("mla_decoupled", dict(rope_fraction=0.25), D * H * K + D * C + C * H * 48 + C * H * K + D * 16
     + H * K * D, C + 16),
    ("mla_decoupled", dict(rope_fraction=0.0), D * H * K + D * C + 2 * C * H * K + H * K * D, C),
    ("mla_decoupled", dict(rope_fraction=1.0), D * H * K + D * C + C * H * K + D * K + H * K * D, C + K),
])
def test_llama_130m_accounting(kind, attn, params, kv_elems):
    cfg = make_cfg(kind, preset="llama_130m", dtype="bfloat16", **{"rope_fraction": 0.5, **attn})
    assert attention.param_count(cfg) == params
    assert attention.kv_cache_bytes_per_token(cfg) == kv_elems * 2 * L  # bf16, all 12 layers
    line = attention.describe(cfg)
    assert kind in line and f"{params:,} params" in line and f"{kv_elems * 2 * L:,} bytes" in line


def test_bfloat16_forward_is_finite_and_in_compute_dtype(rng):
    for kind in KINDS:
        cfg = make_cfg(kind, dtype="bfloat16", rope_fraction=0.5, impl="auto")
        x, positions = inputs(rng, cfg)
        module, variables = build(rng, cfg, x, positions)
        y = module.apply(variables, x, positions)
        assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
