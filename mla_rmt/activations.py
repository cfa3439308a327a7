"""Activation diagnostics of "Mind the Gap" on a fixed probe batch.

Per layer: the top two singular values of the attention matrix that mixes the tokens
(A, or its centred form under remove_gap) and their ratio, the stable rank of the layer
output (mla_rmt/stable_rank.py, the package's one definition), and the entropy of the
softmax rows in bits.
"""
import jax
import jax.numpy as jnp

from mla_rmt import attention, spectral, stable_rank
from mla_rmt.model import Transformer
from mla_rmt.model_config import ModelConfig

HIGHEST = jax.lax.Precision.HIGHEST


def _gram_eigs(x_NxTxK):
    """Eigenvalues (descending) of the smaller Gram of each [T, K] matrix: squared singular values."""
    if x_NxTxK.shape[-1] <= x_NxTxK.shape[-2]:
        gram = jnp.einsum("ntk,ntl->nkl", x_NxTxK, x_NxTxK, precision=HIGHEST)
    else:
        gram = jnp.einsum("ntk,nsk->nts", x_NxTxK, x_NxTxK, precision=HIGHEST)
    return jnp.clip(spectral.eigvalsh(gram)[..., ::-1], 0.0, None)


def attention_stats(mix_BxHxTxT, probs_BxHxTxT):
    """sigma1, sigma2 of the mixing matrix (mean over sequences and heads) and row entropy (bits)."""
    b, h, t, _ = mix_BxHxTxT.shape
    sq = _gram_eigs(mix_BxHxTxT.reshape(b * h, t, t).astype(jnp.float32))
    sigma = jnp.sqrt(sq[:, :2])
    p = probs_BxHxTxT.astype(jnp.float32)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    sigma1, sigma2 = sigma[:, 0].mean(), sigma[:, 1].mean()
    return {"attn_sigma1": sigma1, "attn_sigma2": sigma2,
            "attn_sigma_ratio": sigma1 / jnp.maximum(sigma2, 1e-30),
            "attn_entropy_bits": entropy.mean()}


def rep_stable_rank(x_BxTxD):
    """Stable rank of each sequence's token representations, mean over the batch: T if isotropic, 1 if collapsed."""
    return stable_rank.from_gram_eigs(_gram_eigs(x_BxTxD.astype(jnp.float32))).mean()


def probe(cfg: ModelConfig, params, tokens_BxT) -> dict[str, jax.Array]:
    """Per-layer activation metrics, each of shape [num_layers]; jit-able."""
    _, state = Transformer(cfg, capture=True).apply({"params": params}, tokens_BxT,
                                                    mutable=["intermediates"])
    layers = state["intermediates"]["layers"]
    mix_LxBxHxTxT = layers["attention"]["probs_BxHxTxT"][0]
    out_LxBxTxD = layers["output_BxTxD"][0]
    probs = mix_LxBxHxTxT
    if cfg.remove_gap:                       # the capture holds the centred mixer; entropy is of A
        probs = attention.uncentre(mix_LxBxHxTxT, cfg.remove_gap_mode)
    stats = jax.vmap(attention_stats)(mix_LxBxHxTxT, probs)
    stats["rep_stable_rank"] = jax.vmap(rep_stable_rank)(out_LxBxTxD)
    return stats
