"""mla_rmt.diagnostics: which matrices each kind analyses, their gauge invariance, structural
ranks, nulls at init, and the head reductions of the logged scalars.

References are float64 numpy written here: the effective maps rebuilt from the raw parameters,
the matrices formed explicitly and decomposed by SVD. Fresh random draws (seed printed).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_rmt import attention, diagnostics, events, presets, spectral
from mla_rmt.model_config import ModelConfig

KINDS = ("mha", "gqa", "mla_prerope", "mla_decoupled")


def make_cfg(kind, f, d=64, heads=4, d_head=16, kv_latent=24, q_latent=0):
    c = presets.base_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.d_head, m.mlp_dim, m.vocab_size = 1, d, heads, d_head, 64, 64
    a = m.attention
    a.kind, a.rope_fraction, a.kv_latent_dim, a.q_latent_dim = kind, f, kv_latent, q_latent
    a.num_kv_heads = 2 if kind == "gqa" else 0
    return ModelConfig.from_config(m)


def init_params(cfg, seed):
    module = attention.get(cfg.kind)(cfg)
    x = jnp.zeros((1, 1, cfg.d_model), jnp.float32)
    params = nn.meta.unbox(module.init(jax.random.key(seed), x, jnp.zeros((1, 1), jnp.int32))["params"])
    return jax.tree.map(lambda w: np.asarray(w, np.float64), params)


def maps_float64(cfg, p):
    """W_Q, W_K [D, H, K] from the raw parameters in float64 (independent of Attention.qk_maps)."""
    h = cfg.num_heads
    if cfg.kind in ("mha", "gqa"):
        return p["w_q"], np.repeat(p["w_k"], h // p["w_k"].shape[1], axis=1)
    q_map = (lambda w: np.einsum("dc,chk->dhk", p["w_dq"], w)) if cfg.q_latent_dim else (lambda w: w)
    kv_map = lambda w: np.einsum("dc,chk->dhk", p["w_dkv"], w)
    if cfg.kind == "mla_prerope":
        return q_map(p["w_uq"]), kv_map(p["w_uk"])
    q, k = [], []
    if cfg.rope_dims:
        q.append(q_map(p["w_qr"]))
        k.append(np.repeat(p["w_kr"][:, None, :], h, axis=1))
    if cfg.d_head > cfg.rope_dims:
        q.append(q_map(p["w_uq"]))
        k.append(kv_map(p["w_uk"]))
    return np.concatenate(q, axis=-1), np.concatenate(k, axis=-1)


def explicit_matrices(spec, wq, wk):
    """The analysed matrix (or one per head) formed explicitly in float64: [n, r, c]."""
    q, k = wq[..., spec.dims[0]:spec.dims[1]], wk[..., spec.dims[0]:spec.dims[1]]
    d = q.shape[0]
    if spec.form == "circuit":
        return np.einsum("dhk,ehk->hde", q, k)
    if spec.form == "sum":
        return np.einsum("dhk,ehk->de", q, k)[None] / d
    return (q.reshape(d, -1).T @ k.reshape(d, -1))[None] / d


def squared_singular_values(m):
    return np.linalg.svd(m, compute_uv=False) ** 2


def gauge(rng, cfg, wq, wk, scalars=True, maps=True):
    """A per-head reparametrisation that leaves every logit unchanged: q_h -> c_h q_h R_h,
    k_h -> k_h R_h^-T / c_h, R_h acting on the unrotated dims only, its condition number at most
    10 (random rotations about singular values in [1, 10])."""
    wq, wk = wq.copy(), wk.copy()
    r = cfg.rope_dims
    for h in range(cfg.num_heads):
        if scalars:
            c = rng.lognormal(0.0, 1.0)
            wq[:, h] *= c
            wk[:, h] /= c
        if maps and cfg.d_head > r:
            n = cfg.d_head - r
            u, v = (np.linalg.qr(rng.standard_normal((n, n)))[0] for _ in range(2))
            m = (u * np.exp(rng.uniform(0.0, np.log(10.0), n))) @ v.T
            wq[:, h, r:] = wq[:, h, r:] @ m
            wk[:, h, r:] = wk[:, h, r:] @ np.linalg.inv(m).T
    return wq, wk


def logits(wq, wk, x_TxD):
    """Every head's logits at relative offset 0: [H, T, T]."""
    return np.einsum("thk,shk->hts", np.einsum("td,dhk->thk", x_TxD, wq),
                     np.einsum("td,dhk->thk", x_TxD, wk))


# Compiled once per (matrices, shapes, dtype): the gauged maps reuse the original's executable.
_spectra_of_maps = jax.jit(diagnostics.spectra_of_maps, static_argnums=2)


def metrics(specs, wq, wk, dtype=jnp.float32):
    """The in-step spectra of one layer's maps; float64 under jax's x64 mode (the same code)."""
    with jax.enable_x64(dtype == jnp.float64):
        got = _spectra_of_maps(jnp.asarray(wq, dtype), jnp.asarray(wk, dtype), specs)
        return jax.tree.map(np.asarray, got)


# What each kind analyses ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_lists_its_matrices_and_defaults_exclude_the_cross_gram(kind):
    for f in (0.0, 0.5, 1.0):
        cfg = make_cfg(kind, f)
        specs = diagnostics.available(cfg)
        names = [s.name for s in specs]
        assert len(set(names)) == len(names)
        defaults = {s.name for s in specs if s.default}
        assert {"qk_circuit", "qk_circuit_sum"} <= defaults
        assert not any(s.form == "gram" for s in specs if s.default)   # gauge-dependent
        assert "qk_gram" in names                                       # still by name
        split = kind == "mla_decoupled" and f == 0.5
        assert ({"qk_circuit_rope", "qk_circuit_content"} <= defaults) == split
        assert {m.name for m in diagnostics.matrices(cfg)} == defaults
        assert [m.name for m in diagnostics.matrices(cfg, "product", ("qk_gram",))] == ["qk_gram"]
    with pytest.raises(ValueError, match="config.diagnostics.matrices.*nope"):
        diagnostics.matrices(make_cfg(kind, 0.5), "product", ("nope",))


def test_diagnostics_module_has_no_branch_on_a_kind_name():
    source = open(diagnostics.__file__).read()
    for kind in KINDS + ("decoupled", "prerope"):
        assert kind not in source, kind


# Gauge invariance ------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [0.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_default_matrices_are_gauge_invariant(rng, kind, f):
    """Random per-head scalars and invertible maps on the unrotated dims leave every logit and
    every metric of every default matrix unchanged (rel 1e-4, the diagnostics' own code run in
    float64); the fp32 route stays close to the float64 SVD on both weight sets (the gauged
    factors' conditioning moves its rounding, not what it computes); the cross-Gram moves."""
    cfg = make_cfg(kind, f)
    params = init_params(cfg, int(rng.integers(1 << 30)))
    wq, wk = maps_float64(cfg, params)
    for ours, theirs in zip((wq, wk), attention.get(kind).qk_maps(cfg, params)):  # same maps
        np.testing.assert_allclose(np.asarray(theirs), ours, rtol=1e-4, atol=1e-5 * np.abs(ours).max())
    gq, gk = gauge(rng, cfg, wq, wk)
    x = rng.standard_normal((8, cfg.d_model))
    np.testing.assert_allclose(logits(gq, gk, x), logits(wq, wk, x), rtol=1e-9, atol=1e-9)
    specs = diagnostics.matrices(cfg)
    before, after = metrics(specs, wq, wk, jnp.float64), metrics(specs, gq, gk, jnp.float64)
    fp32 = {"before": metrics(specs, wq, wk), "after": metrics(specs, gq, gk)}
    for m in specs:
        ref = squared_singular_values(explicit_matrices(m.spec, wq, wk))[..., :m.rank]
        ref_gauged = squared_singular_values(explicit_matrices(m.spec, gq, gk))[..., :m.rank]
        np.testing.assert_allclose(ref_gauged, ref, rtol=1e-8, atol=1e-10 * ref.max())
        # fp32 against the float64 SVD, within 1e-4 lambda_1 on the init weights and on the gauged
        # ones (maps of condition at most 10: measured up to 5.8e-6 lambda_1, docs/spectral.md).
        for which, spectra, bound in (("before", fp32["before"], 1e-4), ("after", fp32["after"], 1e-4)):
            got = spectra[m.name]["eigenvalues"].reshape(ref.shape)
            assert np.all(np.abs(got - ref) <= bound * ref.max(axis=-1, keepdims=True)), (m.name, which)
        for metric in spectral.METRIC_NAMES:
            np.testing.assert_allclose(after[m.name][metric], before[m.name][metric], rtol=1e-4,
                                       atol=1e-6, err_msg=f"{kind} f={f} {m.name} {metric}")
    gram = diagnostics.matrices(cfg, "product", ("qk_gram",))
    g0, g1 = metrics(gram, wq, wk)["qk_gram"], metrics(gram, gq, gk)["qk_gram"]
    assert abs(g1["stable_rank"] - g0["stable_rank"]) > 1e-2 * g0["stable_rank"]


# Structural ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("q_latent", [0, 12])
@pytest.mark.parametrize("kind", KINDS)
def test_ranks_are_structural_and_no_zero_is_analysed(rng, kind, q_latent):
    """p of every matrix (defaults and by-name) equals the float64 rank of the matrix, for every
    f; the p analysed values are the nonzero ones, and they equal the float64 SVD's."""
    if q_latent and kind in ("mha", "gqa"):
        pytest.skip("no query latent")
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        cfg = make_cfg(kind, f, q_latent=q_latent)
        wq, wk = maps_float64(cfg, init_params(cfg, int(rng.integers(1 << 30))))
        specs = diagnostics.available(cfg)
        for spec in specs:
            ref = squared_singular_values(explicit_matrices(spec, wq, wk))      # [n, min(r, c)]
            # A structural zero is ~1e-32 of lambda_1 in float64; a square Gaussian product's
            # smallest true value falls below 1e-10 of it in a few percent of draws, below 1e-20
            # practically never.
            rank = np.sum(ref > 1e-20 * ref[..., :1], axis=-1)
            assert np.all(rank == spec.rank), (kind, f, q_latent, spec.name, rank, spec.rank)
            got = np.asarray(diagnostics.esd(jnp.asarray(wq, jnp.float32), jnp.asarray(wk, jnp.float32),
                                             spec)).reshape(ref.shape[0], -1)
            assert got.shape[-1] == spec.rank
            top = ref[..., :spec.rank]
            assert np.all(np.abs(got - top) <= 1e-4 * top[..., :1]), (kind, f, spec.name)
            metrics_ = spectral.mp_metrics(got, None, spectral.NullLaw(3.0, 0.8))   # any law
            np.testing.assert_allclose(metrics_["stable_rank_frac"] * spec.rank,
                                       top.sum(-1) / top[..., 0], rtol=1e-4)


# Nulls at init -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_init_sits_inside_every_default_null(rng, kind):
    """Fresh init draws (not the null's own): mean outlier_count <= 0.3 and mean mp_gap <= 0.05
    for every default matrix, analytic and sampled nulls alike (tiny model shape). The expected
    count is ~0.15-0.25 (a spectrum is flagged when lambda_1 passes the Tracy–Widom quantile
    the edge sits at); a per-layer matrix gives one count per draw (sd ~0.45), so the mean over
    300 draws has a standard error ~0.03. The count is tested as a one-sided z-test: mean <= 0.3
    + 4 standard errors (over draws; heads of one draw share factors), which a law flagging
    0.3 per spectrum fails with probability 3e-5, and a wrong null (classical MP, an edge at
    the mean of lambda_1: counts >= 0.5) fails at once."""
    cfg = make_cfg(kind, 0.5, d=128, heads=4, d_head=32, kv_latent=64)
    specs = diagnostics.matrices(cfg)
    module = attention.get(kind)(cfg)
    x, pos = jnp.zeros((1, 1, cfg.d_model)), jnp.zeros((1, 1), jnp.int32)
    run = jax.jit(jax.vmap(lambda key: diagnostics.spectra_of_maps(
        *module.qk_maps(cfg, module.init(key, x, pos)["params"]), specs)))
    draws = 300
    got = run(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), draws))
    for m in specs:
        per_draw = np.asarray(got[m.name]["outlier_count"], np.float64).reshape(draws, -1).mean(-1)
        count, sem = per_draw.mean(), per_draw.std() / np.sqrt(draws)
        gap = float(np.mean(got[m.name]["mp_gap"]))
        print(f"{kind} {m.name}: mean outlier_count {count:.3f} (sem {sem:.3f}) mean mp_gap "
              f"{gap:.4f} ({'sampled' if m.gammas is None else 'analytic'} null)")
        assert count <= 0.3 + 4 * sem and gap <= 0.05, (kind, m.name, count, sem, gap)


def test_planted_spike_in_a_decoupled_head_is_found(rng):
    """A shared direction planted in one head's query and key maps (above the BBP threshold)
    stands out in that head's circuit against the sampled whole-head null."""
    cfg = make_cfg("mla_decoupled", 0.5, d=128, heads=4, d_head=32, kv_latent=64)
    wq, wk = maps_float64(cfg, init_params(cfg, int(rng.integers(1 << 30))))
    u, v = rng.standard_normal((2, cfg.d_model))
    z = rng.standard_normal(cfg.d_head)
    wq[:, 1] += 3.0 * np.outer(u / np.linalg.norm(u), z / np.linalg.norm(z))
    wk[:, 1] += 3.0 * np.outer(v / np.linalg.norm(v), z / np.linalg.norm(z))
    got = metrics(diagnostics.matrices(cfg, "product", ("qk_circuit",)), wq, wk)["qk_circuit"]
    assert got["outlier_count"][1] >= 1 and got["mp_gap"][1] > 0.5, got["mp_gap"]


# Tags ------------------------------------------------------------------------------------------

def test_layer_scalars_report_head_mean_and_head_max_apart(rng):
    spectra = {"qk_circuit": {m: rng.random((3, 4)) for m in spectral.METRIC_NAMES},
               "qk_circuit_sum": {m: rng.random(3) for m in spectral.METRIC_NAMES}}
    out = diagnostics.layer_scalars(spectra)
    v = spectra["qk_circuit"]["mp_gap"]
    for layer in range(3):
        assert out[f"spectral/qk_circuit/mp_gap/head_mean/layer_{layer:02d}"] == pytest.approx(v[layer].mean())
        assert out[f"spectral/qk_circuit/mp_gap/head_max/layer_{layer:02d}"] == pytest.approx(v[layer].max())
        assert f"spectral/qk_circuit/mp_gap/layer_{layer:02d}" not in out
        assert out[f"spectral/qk_circuit_sum/mp_gap/layer_{layer:02d}"] == spectra["qk_circuit_sum"]["mp_gap"][layer]
    assert out["spectral/qk_circuit/mp_gap/head_max/max"] == pytest.approx(v.max())
    assert out["spectral/qk_circuit/mp_gap/head_mean/mean"] == pytest.approx(v.mean())
    assert out["spectral/qk_circuit_sum/mp_gap/max"] == pytest.approx(spectra["qk_circuit_sum"]["mp_gap"].max())
    import pandas as pd
    scalars = pd.DataFrame([("t", tag, 7, value) for tag, value in out.items()],
                           columns=["trial", "tag", "step", "value"])
    for heads, fn in (("head_mean", np.mean), ("head_max", np.max)):
        table = events.layer_values(scalars, "mp_gap", "qk_circuit", heads)["t"]
        np.testing.assert_allclose(table[7].to_numpy(), fn(v, axis=1))
    with pytest.raises(ValueError, match="per head"):
        events.layer_values(scalars, "mp_gap", "qk_circuit")
    np.testing.assert_allclose(events.layer_values(scalars, "mp_gap", "qk_circuit_sum")["t"][7].to_numpy(),
                               spectra["qk_circuit_sum"]["mp_gap"])


def test_the_exported_replication_scalars_still_load():
    path = os.path.join(os.path.dirname(__file__), "..", "results", "replication", "scalars.json.gz")
    scalars, trials = events.load(path)
    assert len(trials) > 0
    table = events.layer_values(scalars, "mp_gap", "qk_gram")
    assert table and all(t.shape[0] > 0 for t in table.values())
