"""remove_gap's two causal centrings: "uniform" A - U and "scaled" diag(i/T)(A - U).

Causality and a float64 reference for every kind, and the effect at initialisation on the
"Mind the Gap" model: only the scaled form keeps the stable rank growing linearly in T.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_rmt import attention, stable_rank
from mla_rmt.experiments import rank_collapse
from mla_rmt.model_config import ConfigError
from test_attention import B, KINDS, T, build, inputs, make_cfg


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_centring_is_causal(rng, kind):
    cfg = make_cfg(kind, rope_fraction=0.5, remove_gap=True, remove_gap_mode="scaled", q_latent_dim=24)
    x, positions = inputs(rng, cfg)
    module, variables = build(rng, cfg, x, positions)
    t = int(rng.integers(1, T - 1))
    x2 = x.at[:, t + 1:].set(rng.standard_normal((B, T - t - 1, cfg.d_model)).astype(np.float32))
    y, y2 = module.apply(variables, x, positions), module.apply(variables, x2, positions)
    assert np.array_equal(y[:, :t + 1], y2[:, :t + 1])
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", attention.GAP_MODES)
def test_centring_against_float64(rng, kind, mode):
    cfg = make_cfg(kind, remove_gap=True, remove_gap_mode=mode)
    plain = make_cfg(kind, remove_gap=False)
    x, positions = inputs(rng, cfg)
    module, variables = build(rng, cfg, x, positions)
    _, state = module.apply(variables, x, positions, capture=True, mutable=["intermediates"])
    _, plain_state = attention.get(kind)(plain).apply(variables, x, positions, capture=True,
                                                      mutable=["intermediates"])
    mix = np.asarray(state["intermediates"]["probs_BxHxTxT"][0], np.float64)
    a = np.asarray(plain_state["intermediates"]["probs_BxHxTxT"][0], np.float64)
    lower = np.tril(np.ones((T, T)))
    i = np.arange(1, T + 1)[:, None]
    want = a - lower / i if mode == "uniform" else (i * a - lower) / T
    np.testing.assert_allclose(mix, want, atol=1e-6)
    np.testing.assert_allclose(mix.sum(-1), 0.0, atol=1e-6)
    assert np.all(np.triu(mix, 1) == 0)
    np.testing.assert_allclose(attention.uncentre(jnp.asarray(mix, jnp.float32), mode), a, atol=1e-5)


def _sr_at_init(t, draws, rng):
    """Mean sr(P X0 W_V) over draws of the paper's model, P each of the model's centrings of
    the same causal A (both modes see the same draws): {mode: mean}."""
    g = np.stack([rank_collapse.paper_logits(t, rng) for _ in range(draws)])
    logits = np.where(np.tril(np.ones((t, t), bool)), g, -np.inf)
    a_c = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    xv = np.stack([rank_collapse.haar_rows(t, t, rng) @ rng.standard_normal((t, t)) / np.sqrt(t)
                   for _ in range(draws)])
    return {mode: float(np.mean(stable_rank.of_tokens(np.asarray(attention.centre(a_c, mode), np.float64) @ xv)))
            for mode in attention.GAP_MODES}


def test_only_the_scaled_centring_grows_linearly_in_t(rng):
    """One draw's stable rank fluctuates by ~20%: over 4 draws the ratio for T x4 measured
    3.30 +- 0.48 (sd over 40 runs), so 32 draws per point (sd ~0.17) keep every bound >= 4.5 sd
    away (failure ~1e-6), and the linear growth (ratio > 2.5) still far from A - U's ~1.2."""
    ts, draws = (64, 256), 32
    sr = [_sr_at_init(t, draws, rng) for t in ts]
    scaled, uniform = [s["scaled"] for s in sr], [s["uniform"] for s in sr]
    for t, s in zip(ts, scaled):                       # ~0.05 T
        assert 0.03 * t < s < 0.09 * t
    assert scaled[1] / scaled[0] > 2.5                 # T x4: about x3.5
    assert uniform[1] / uniform[0] < 2.0               # A - U: far from linear
    assert scaled[1] > 3 * uniform[1]


def test_bad_mode_names_the_field():
    with pytest.raises(ConfigError, match=re.escape("config.model.attention.remove_gap_mode")):
        make_cfg("mha", remove_gap=True, remove_gap_mode="bidirectional")
    with pytest.raises(ValueError, match="remove_gap_mode"):
        attention.centre(jnp.ones((1, 1, 4, 4)), "bidirectional")
