"""Spectral diagnostics of the attention weights, per layer, from inside the train step.

Each attention kind lists the matrices it analyses (`Attention.spectral_matrices`: dims, form,
structural rank, factor chain); this module only reads that list. From the kind's effective maps
W_Q, W_K [D, H, K] (`Attention.qk_maps`) it forms, per matrix, the per-head circuit
C_h = W_Q^h W_K^hT, the summed circuit W_Q W_K^T / D or the cross-Gram W_Q^T W_K / D
(docs/spectral.md), takes the ESD from `spectral.product_esd` (small Gram factors and eigvalsh),
keeps the p = rank nonzero values and reads them against the null law of the kind's init.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import attention, spectral, tags
from mla_rmt.model_config import ModelConfig

NULL_DRAWS = 64     # init draws of one layer for a null law that is not one product chain
NULL_SEED = 1234
DEFAULT = "default"   # in config.diagnostics.matrices: the kind's default matrices


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One analysed matrix: the kind's description of it and its null law."""
    spec: attention.SpectralMatrix
    null: spectral.NullLaw
    gammas: tuple[float, ...] | None   # None when the null law was sampled

    name = property(lambda self: self.spec.name)
    per_head = property(lambda self: self.spec.per_head)
    rank = property(lambda self: self.spec.rank)


def esd(wq_DxHxK, wk_DxHxK, spec: attention.SpectralMatrix):
    """Descending nonzero eigenvalues of one matrix: [H, rank] per head, else [rank]."""
    start, stop = spec.dims
    wq, wk = wq_DxHxK[..., start:stop], wk_DxHxK[..., start:stop]
    d = wq.shape[0]
    if spec.form == "circuit":           # C_h = W_Q^h W_K^hT: factors [D, width] per head
        return spectral.product_esd(jnp.moveaxis(wq, 1, 0), jnp.moveaxis(wk, 1, 0))[..., :spec.rank]
    if spec.form == "sum":
        # W_Q W_K^T / D formed explicitly: every term W_Q^h W_K^hT is rounded as one product, so
        # per-head rescalings cancel in fp32 too (Gram factors of the stacked maps would carry
        # the spread of the heads' scales into their rounding error).
        s_DxD = jnp.einsum("dhk,ehk->de", wq, wk, precision=spectral.HIGHEST) / d
        return spectral.esd(s_DxD)[:spec.rank]
    if spec.form == "gram":              # W_Q^T W_K / D: factors [m, D]
        return spectral.product_esd(wq.reshape(d, -1).T, wk.reshape(d, -1).T)[:spec.rank] / d ** 2
    raise ValueError(f"{spec.name}: unknown form {spec.form!r}; one of {attention.FORMS}")


def _sampled_nulls(cfg: ModelConfig, specs) -> dict[str, spectral.NullLaw]:
    """The null laws of this kind's own init, from NULL_DRAWS draws of one layer at the true size."""
    if not specs:
        return {}
    module = attention.get(cfg.kind)(cfg)
    x = jnp.zeros((1, 1, cfg.d_model), cfg.compute_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)

    @jax.jit
    @jax.vmap
    def draw(key):
        wq, wk = module.qk_maps(cfg, module.init(key, x, pos)["params"])
        return {s.name: esd(wq, wk, s) for s in specs}

    eigs = draw(jax.random.split(jax.random.key(NULL_SEED), NULL_DRAWS))
    return {s.name: spectral.sampled_null_law(np.asarray(eigs[s.name]).reshape(-1, s.rank))
            for s in specs}


def available(cfg: ModelConfig) -> tuple[attention.SpectralMatrix, ...]:
    return attention.get(cfg.kind).spectral_matrices(cfg)


@functools.lru_cache(maxsize=None)
def matrices(cfg: ModelConfig, null: str = "product", names: tuple[str, ...] = ()) -> tuple[Matrix, ...]:
    """The analysed matrices of a model, nulls computed once: those named, where the name
    DEFAULT stands for the kind's gauge-invariant defaults (no names: the defaults alone)."""
    specs = available(cfg)
    unknown = set(names) - {s.name for s in specs} - {DEFAULT}
    if unknown:
        raise ValueError(f"config.diagnostics.matrices: {sorted(unknown)} are not analysed for "
                         f"kind {cfg.kind!r}; available: {DEFAULT!r} and "
                         f"{sorted(s.name for s in specs)}")
    defaults = not names or DEFAULT in names
    chosen = [s for s in specs if (defaults and s.default) or s.name in names]
    sampled = _sampled_nulls(cfg, tuple(s for s in chosen if s.chain is None))
    out = []
    for spec in chosen:
        if spec.chain is None:
            out.append(Matrix(spec, sampled[spec.name], None))
        else:
            gammas = spectral.chain_gammas(spec.chain)
            out.append(Matrix(spec, spectral.null_law(gammas, null), gammas))
    return tuple(out)


def configured_matrices(cfg: ModelConfig, diagnostics_config) -> tuple[Matrix, ...]:
    """matrices() as config.diagnostics names them (`matrices`: comma-separated names, "" or
    "default" = the kind's defaults, e.g. "default,qk_gram"; `null`)."""
    names = tuple(n.strip() for n in diagnostics_config.matrices.split(",") if n.strip())
    return matrices(cfg, diagnostics_config.null, names)


def spectra_of_maps(wq_DxHxK, wk_DxHxK, specs: tuple[Matrix, ...]) -> dict[str, dict[str, jax.Array]]:
    """{matrix: {'eigenvalues': [(H,) p], metric: [(H,)]}} of one layer's effective maps."""
    out = {}
    for m in specs:
        eigs = esd(wq_DxHxK, wk_DxHxK, m.spec)
        out[m.name] = {"eigenvalues": eigs, **spectral.mp_metrics(eigs, None, m.null)}
    return out


def weight_spectra(params, cfg: ModelConfig, specs: tuple[Matrix, ...]) -> dict[str, dict[str, jax.Array]]:
    """{matrix: {'eigenvalues': [L, (H,) p], metric: [L, (H,)]}} for the model's params."""
    layer_params = params["layers"]["attention"]

    def one_layer(p):
        wq, wk = attention.get(cfg.kind).qk_maps(cfg, p)
        return {m.name: esd(wq, wk, m.spec) for m in specs}

    eigs = jax.vmap(one_layer)(jax.lax.stop_gradient(layer_params))
    return {m.name: {"eigenvalues": eigs[m.name], **spectral.mp_metrics(eigs[m.name], None, m.null)}
            for m in specs}


_HEAD_REDUCTIONS = dict(zip(tags.HEAD_REDUCTIONS, (np.mean, np.max)))


def layer_scalars(spectra: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """TensorBoard scalars (docs/spectral.md, "Tags").

    Per-layer matrix: the value of each layer, and its mean and max over layers. Per-head
    matrix: the mean and the max over each layer's heads, the mean over layers and heads, and
    the max over all heads of all layers.
    """
    out = {}
    for name, values in spectra.items():
        for metric in spectral.METRIC_NAMES:
            v = np.asarray(values[metric], np.float64)        # [L] or [L, H]
            if v.ndim == 1:
                out.update({tags.spectral(name, metric, layer): float(x) for layer, x in enumerate(v)})
                out[tags.spectral_over_layers(name, metric, "mean")] = float(v.mean())
                out[tags.spectral_over_layers(name, metric, "max")] = float(v.max())
                continue
            for heads, fn in _HEAD_REDUCTIONS.items():
                out.update({tags.spectral(name, metric, layer, heads): float(x)
                            for layer, x in enumerate(fn(v, axis=1))})
            out[tags.spectral_over_layers(name, metric, "mean", "head_mean")] = float(v.mean())
            out[tags.spectral_over_layers(name, metric, "max", "head_max")] = float(v.max())
    return out
