"""Activation diagnostics and the rank-collapse experiment against float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
from conftest import init_params

from mla_rmt import activations, presets
from mla_rmt.model import Transformer
from mla_rmt.model_config import ModelConfig


def _row_stochastic(rng, shape):
    logits = rng.standard_normal(shape) * 2
    a = np.exp(logits)
    return a / a.sum(-1, keepdims=True)


def test_attention_stats_match_numpy(rng):
    probs = _row_stochastic(rng, (3, 2, 12, 12))
    mix = probs - 1.0 / 12
    got = jax.device_get(activations.attention_stats(jnp.asarray(mix, jnp.float32),
                                                     jnp.asarray(probs, jnp.float32)))
    s = np.linalg.svd(mix, compute_uv=False)                    # [3, 2, 12]
    np.testing.assert_allclose(got["attn_sigma1"], s[..., 0].mean(), rtol=1e-4)
    np.testing.assert_allclose(got["attn_sigma2"], s[..., 1].mean(), rtol=1e-4)
    np.testing.assert_allclose(got["attn_sigma_ratio"], s[..., 0].mean() / s[..., 1].mean(), rtol=1e-4)
    entropy = -(probs * np.log2(probs)).sum(-1).mean()
    np.testing.assert_allclose(got["attn_entropy_bits"], entropy, rtol=1e-4)


def test_rep_stable_rank_matches_numpy_and_its_extremes(rng):
    x = rng.standard_normal((4, 10, 24))
    s = np.linalg.svd(x, compute_uv=False) ** 2                  # eigenvalues of X X^T
    want = ((s ** 2).sum(-1) / s[:, 0] ** 2).mean()
    np.testing.assert_allclose(float(activations.rep_stable_rank(jnp.asarray(x, jnp.float32))), want, rtol=1e-4)
    collapsed = np.repeat(rng.standard_normal((1, 1, 24)), 10, axis=1)   # every token the same
    np.testing.assert_allclose(float(activations.rep_stable_rank(jnp.asarray(collapsed, jnp.float32))), 1.0, rtol=1e-4)
    isotropic = np.linalg.qr(rng.standard_normal((24, 10)))[0].T[None]  # orthonormal tokens
    np.testing.assert_allclose(float(activations.rep_stable_rank(jnp.asarray(isotropic, jnp.float32))), 10.0, rtol=1e-4)


def test_probe_on_the_tiny_model_vanilla_against_remove_gap(rng):
    config = presets.base_config()
    config.model.dtype = "float32"
    config.model.scan_unroll = 1        # rolled: compiles faster, computes the same (test_model.py)
    tokens = rng.integers(0, config.model.vocab_size, (2, 32)).astype(np.int32)
    results = {}
    for remove_gap, mode in ((False, "uniform"), (True, "uniform"), (True, "scaled")):
        config.model.attention.remove_gap = remove_gap
        config.model.attention.remove_gap_mode = mode
        cfg = ModelConfig.from_config(config.model)
        params = init_params(Transformer(cfg), jax.random.key(0), tokens)
        stats = jax.device_get(jax.jit(activations.probe, static_argnums=0)(cfg, params, tokens))
        assert set(stats) == {"attn_sigma1", "attn_sigma2", "attn_sigma_ratio", "attn_entropy_bits",
                              "rep_stable_rank"}
        assert all(v.shape == (cfg.num_layers,) and np.isfinite(v).all() for v in stats.values())
        assert (stats["attn_entropy_bits"] > 0).all() and (stats["attn_entropy_bits"] <= np.log2(32)).all()
        results[remove_gap, mode] = stats
    # A causal row-stochastic matrix has sigma1 >= 1 (the Perron outlier); A - U removes it.
    vanilla = results[False, "uniform"]
    assert (vanilla["attn_sigma1"] >= 1 - 1e-5).all()
    assert (results[True, "uniform"]["attn_sigma1"] < vanilla["attn_sigma1"]).all()
    # Layer 0 sees the same input in every run: the entropy is of A whatever the centring.
    for key in ((True, "uniform"), (True, "scaled")):
        np.testing.assert_allclose(results[key]["attn_entropy_bits"][0], vanilla["attn_entropy_bits"][0],
                                   rtol=1e-4)
