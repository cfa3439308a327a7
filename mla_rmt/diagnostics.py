"""Spectral diagnostics of the attention weights, per layer, from inside the train step.

For every layer the kind's effective maps W_Q, W_K [D, H, K] (`Attention.qk_maps`) give the
matrices of DESIGN 4.1: `qk_gram` G = W_Q^T W_K / D (m x m, m = H K), `qk_circuit`
C_h = W_Q^h W_K^hT per head, and for mla_decoupled the two branches `qk_gram_content` and
`qk_gram_rope` apart. Their ESDs come from `spectral.product_esd` (K x K Gram factors and
eigvalsh), the metrics from `spectral.mp_metrics` against the null law of the kind's init.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import attention, spectral
from mla_rmt.model_config import ModelConfig

NULL_SAMPLES = 8   # init draws for a null law that is not a pure product chain


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One analysed matrix: which head dims it reads, per head or stacked, its rank and null."""
    name: str
    dims: tuple[int, int]          # [start, stop) of each head's qk dims
    per_head: bool
    rank: int                      # p: how many nonzero eigenvalues it has
    null: spectral.NullLaw
    gammas: tuple[float, ...] | None   # None when the null law was sampled


def _pieces(cfg: ModelConfig) -> dict[str, tuple[tuple[int, int], bool]]:
    d_r = cfg.rope_dims
    pieces = {"qk_gram": ((0, cfg.d_head), False), "qk_circuit": ((0, cfg.d_head), True)}
    if cfg.kind == "mla_decoupled" and 0 < d_r < cfg.d_head:
        pieces["qk_gram_content"] = ((d_r, cfg.d_head), False)
        pieces["qk_gram_rope"] = ((0, d_r), False)
    return pieces


def _esd(wq_DxHxK, wk_DxHxK, dims, per_head: bool, rank: int):
    """Descending nonzero eigenvalues: [H, rank] per head, else [rank] of the stacked gram."""
    wq, wk = wq_DxHxK[..., dims[0]:dims[1]], wk_DxHxK[..., dims[0]:dims[1]]
    d = wq.shape[0]
    if per_head:           # C_h = W_Q^h W_K^hT: factors [D, K] per head
        return spectral.product_esd(jnp.moveaxis(wq, 1, 0), jnp.moveaxis(wk, 1, 0))[..., :rank]
    a_mxD, b_mxD = wq.reshape(d, -1).T, wk.reshape(d, -1).T   # G = W_Q^T W_K / D
    return spectral.product_esd(a_mxD, b_mxD)[:rank] / d ** 2


def _sampled_null(cfg: ModelConfig, dims, per_head: bool, rank: int) -> spectral.NullLaw:
    """The null law of this kind's own init, from NULL_SAMPLES draws of one layer."""
    module = attention.get(cfg.kind)(cfg)
    x = jnp.zeros((1, 1, cfg.d_model), cfg.compute_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)

    def draw(key):
        params = module.init(key, x, pos)["params"]
        return _esd(*module.qk_maps(cfg, params), dims, per_head, rank)

    eigs = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(1234), NULL_SAMPLES))
    return spectral.empirical_null_law(np.asarray(eigs).reshape(-1, rank))


@functools.lru_cache(maxsize=None)
def matrices(cfg: ModelConfig, null: str = "product", names: tuple[str, ...] = ()) -> tuple[Matrix, ...]:
    """The analysed matrices of a model (all of the kind's, or those named), nulls computed once."""
    chains = attention.get(cfg.kind).null_chains(cfg)
    out = []
    for name, (dims, per_head) in _pieces(cfg).items():
        if names and name not in names:
            continue
        chain = chains.get(name)
        if chain is not None:
            gammas = spectral.chain_gammas(chain)
            rank = min(chain)
            law = spectral.null_law(gammas, null)
        else:
            width = (dims[1] - dims[0]) * (1 if per_head else cfg.num_heads)
            rank = min(cfg.d_model, width)
            gammas, law = None, _sampled_null(cfg, dims, per_head, rank)
        out.append(Matrix(name, dims, per_head, rank, law, gammas))
    unknown = set(names) - {m.name for m in out}
    if unknown:
        raise ValueError(f"config.diagnostics.matrices: {sorted(unknown)} are not analysed for "
                         f"kind {cfg.kind!r}; available: {sorted(_pieces(cfg))}")
    return tuple(out)


def configured_matrices(cfg: ModelConfig, diagnostics_config) -> tuple[Matrix, ...]:
    """matrices() as config.diagnostics names them (`matrices`: comma-separated, "" = all; `null`)."""
    names = tuple(n.strip() for n in diagnostics_config.matrices.split(",") if n.strip())
    return matrices(cfg, diagnostics_config.null, names)


def weight_spectra(params, cfg: ModelConfig, specs: tuple[Matrix, ...]) -> dict[str, dict[str, jax.Array]]:
    """{matrix: {'eigenvalues': [L, (H,) p], metric: [L, (H,)]}} for the model's params."""
    layer_params = params["layers"]["attention"]

    def one_layer(p):
        wq, wk = attention.get(cfg.kind).qk_maps(cfg, p)
        return {m.name: _esd(wq, wk, m.dims, m.per_head, m.rank) for m in specs}

    eigs = jax.vmap(one_layer)(jax.lax.stop_gradient(layer_params))
    return {m.name: {"eigenvalues": eigs[m.name], **spectral.mp_metrics(eigs[m.name], None, m.null)}
            for m in specs}


def empty_like(tree):
    """Zeros with the structure of the diagnostics: the branch of steps that skip them."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def layer_scalars(spectra: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """TensorBoard scalars: spectral/<matrix>/<metric>/layer_<LL> (mean over heads), mean, max."""
    out = {}
    for name, values in spectra.items():
        for metric in spectral.METRIC_NAMES:
            v = np.asarray(values[metric], np.float64)        # [L] or [L, H]
            per_layer = v.reshape(v.shape[0], -1).mean(axis=1)
            for layer, x in enumerate(per_layer):
                out[f"spectral/{name}/{metric}/layer_{layer:02d}"] = float(x)
            out[f"spectral/{name}/{metric}/mean"] = float(v.mean())
            out[f"spectral/{name}/{metric}/max"] = float(v.max())
    return out
