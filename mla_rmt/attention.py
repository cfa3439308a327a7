"""Attention kinds, chosen by `config.model.attention.kind` from a registry.

A kind is one subclass of `Attention` that maps the layer input to per-head queries,
keys and values (`qkv`), plus one `@register("name")` line. The shared causal core and
the output projection live in the base class, so every kind gets `remove_gap`, the
fused kernel where it applies, and the activation probes for free.

Layout shared by every kind: the rotary dims of a query/key head are its first `rope_dims`
dims, [0, rope_dims); the rest are unrotated ("content"). Parameter names and logical axes:

    mha/gqa        w_q [D,H,K] w_k [D,G,K] w_v [D,G,K]
    mla_prerope    w_dq [D,Cq] (only if q_latent_dim > 0), w_uq [Cq|D,H,K],
                   w_dkv [D,Ckv], w_uk [Ckv,H,K], w_uv [Ckv,H,K]
    mla_decoupled  w_dq, w_dkv as above, w_qr [Cq|D,H,R], w_kr [D,R] (only if R > 0),
                   w_uq [Cq|D,H,K-R], w_uk [Ckv,H,K-R] (only if K-R > 0), w_uv [Ckv,H,K]
    every kind     w_o [H,K,D]

with logical axes embed (D), heads (H), kv_heads (G), head_dim (K), q_latent (Cq),
kv_latent (Ckv), rope_dim (R); "Cq|D" is Cq, or D when q_latent_dim == 0 (c_Q = x). Zero-width pieces are not created (no empty parameters).
"""
import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_rmt import rope
from mla_rmt import model_config
from mla_rmt.model_config import GAP_MODES, ConfigError, ModelConfig  # GAP_MODES: re-exported

_KINDS: dict[str, type["Attention"]] = {}

FORMS = ("circuit", "sum", "gram")


@dataclasses.dataclass(frozen=True)
class SpectralMatrix:
    """One matrix the spectral diagnostics analyse, built from the effective maps W_Q, W_K [D,H,K]
    restricted to each head's qk dims [dims[0], dims[1]) (docs/spectral.md defines them):

    form "circuit": C_h = W_Q^h W_K^hT per head (D x D); "sum": sum_h C_h / D = W_Q W_K^T / D,
    one per layer; "gram": the cross-Gram W_Q^T W_K / D (m x m; gauge-dependent).
    rank: p, its structural rank (how many eigenvalues are analysed).
    chain: dims of the Gaussian-factor chain that builds it at init (null law MP ⊠ ... ⊠ MP),
    or None when it is not one chain (the null law is then sampled from the kind's init).
    key_groups: distinct key heads over these dims (the queries of a group share one key map and
    add up to one Gaussian map in a sum: its chain's inner width is key_groups * width).
    default: analysed when config.diagnostics.matrices is empty; every default is invariant
    under the per-head reparametrisations that leave all logits unchanged.
    """
    name: str
    dims: tuple[int, int]
    form: str
    rank: int
    chain: tuple[int, ...] | None
    key_groups: int
    default: bool

    @property
    def per_head(self) -> bool:
        return self.form == "circuit"


def chain_matrices(cfg: ModelConfig, dims, q_latent=(), k_latent=(), key_groups=None,
                   suffix: str = "") -> tuple[SpectralMatrix, ...]:
    """qk_circuit, qk_circuit_sum (default) and qk_gram (by name) over one Gaussian chain per head:
    query x -> q_latent... -> width, key x -> k_latent... -> width, `key_groups` key heads."""
    d, h, width = cfg.d_model, cfg.num_heads, dims[1] - dims[0]
    g = h if key_groups is None else key_groups
    chains = {"qk_circuit": ("circuit", (d, *q_latent, width, *k_latent[::-1], d), True),
              "qk_circuit_sum": ("sum", (d, *q_latent, g * width, *k_latent[::-1], d), True),
              "qk_gram": ("gram", (h * width, *q_latent[::-1], d, *k_latent, g * width), False)}
    return tuple(SpectralMatrix(name + suffix, tuple(dims), form, min(chain), chain, g, default)
                 for name, (form, chain, default) in chains.items())


def register(name: str) -> Callable[[type["Attention"]], type["Attention"]]:
    def wrap(cls):
        _KINDS[name] = cls
        model_config.KIND_CHECKS[name] = cls.check_config
        cls.kind_name = name
        return cls
    return wrap


def kinds() -> list[str]:
    return sorted(_KINDS)


def get(kind: str) -> type["Attention"]:
    if kind not in _KINDS:
        raise ConfigError(f"config.model.attention.kind: unknown attention kind {kind!r}; "
                          f"registered kinds: {kinds()}")
    return _KINDS[kind]


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes a KV cache holds per token over all layers, in the compute dtype."""
    return get(cfg.kind).kv_cache_elems_per_token(cfg) * cfg.num_layers * jnp.dtype(cfg.compute_dtype).itemsize


def param_count(cfg: ModelConfig) -> int:
    """Parameters of one attention block, from the shapes `init` would build (every kind)."""
    module = get(cfg.kind)(cfg)
    x_BxTxD = jnp.zeros((1, 1, cfg.d_model), cfg.compute_dtype)
    positions_BxT = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x_BxTxD, positions_BxT))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def describe(cfg: ModelConfig) -> str:
    """One line for the run log: kind, rotary dims, params per layer, KV-cache bytes per token."""
    cls = get(cfg.kind)
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
    elems = cls.kv_cache_elems_per_token(cfg)
    return (f"{cfg.kind}{cls.details(cfg)}: rope {cfg.rope_dims}/{cfg.d_head} dims per head "
            f"(f={cfg.rope_fraction:g}), remove_gap="
            f"{cfg.remove_gap and cfg.remove_gap_mode}, "
            f"{param_count(cfg):,} params per layer, KV cache {kv_cache_bytes_per_token(cfg):,} "
            f"bytes per token ({elems} x {itemsize} B per layer x {cfg.num_layers} layers)")


def _f32(params):
    return jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), nn.meta.unbox(params))


def _mm(a, b):
    """a [.., C] x b [C, ..] in fp32 at full precision (for the effective maps)."""
    return jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)


def dense_init(fan_in: int):
    """iid Gaussian with variance 1/fan_in: the null model the spectral diagnostics assume."""
    return nn.initializers.normal(stddev=fan_in ** -0.5)


def causal_uniform(t: int, dtype=jnp.float32):
    """U_TxT with U_ij = 1/i for j <= i (rows 1-based), 0 above the diagonal."""
    rows = jnp.arange(1, t + 1, dtype=dtype)[:, None]
    return jnp.tril(jnp.ones((t, t), dtype)) / rows


def _position_gain(t: int, dtype=jnp.float32):
    """i/T for rows i = 1..T, as a column [T, 1]."""
    return (jnp.arange(1, t + 1, dtype=dtype) / t)[:, None]


def centre(probs_BxHxTxT, mode: str = "uniform"):
    """remove_gap's token mixer from the causal softmax A (row i uses keys j <= i only).

    "Mind the Gap" centres bidirectional attention as A - 11^T/T; in a decoder that would mix
    future tokens into every row. "uniform" subtracts the causal uniform matrix instead, A - U
    (U_ij = 1/i for j <= i): rows sum to zero, causality is kept. It does not carry the paper's
    effect. Causal A at init has no single Perron outlier: its top singular values are those
    of U (the Cesaro operator, norm -> 2), e.g. 1.76, 1.32, 0.99 at T = 800. Row i of A - U is
    the deviation of a softmax over i keys, of squared norm ~ 1/i, so ||A - U||_F^2 grows like
    ln T and the first rows hold the energy: in the paper's model sr((A - U) X W_V) stays at
    1.7-3.0 for T = 25-800, where A - 11^T/T gives 0.065 T. "scaled" multiplies row i by i/T:
    diag(i/T)(A - U) = (diag(i) A - L)/T, L the causal ones, whose entries i A_ij - 1 are close
    to iid with mean 0 at init (the unnormalised weights, centred): the causal analogue of
    (T A - 11^T)/T, with sr growing linearly, 0.052 T. Row T has the scale of the
    bidirectional centring; the gain i/T uses the sequence length T but no later token's value.
    A per-token norm of the attention output would undo the gain. Table and argument:
    docs/spectral.md ("Causal centring").
    """
    t = probs_BxHxTxT.shape[-1]
    mix = probs_BxHxTxT - causal_uniform(t, probs_BxHxTxT.dtype)
    if mode == "scaled":
        mix = mix * _position_gain(t, probs_BxHxTxT.dtype)
    elif mode != "uniform":
        raise ValueError(f"remove_gap_mode: one of {GAP_MODES}, got {mode!r}")
    return mix


def uncentre(mix_BxHxTxT, mode: str = "uniform"):
    """The causal softmax A back from `centre(A, mode)`."""
    t = mix_BxHxTxT.shape[-1]
    if mode == "scaled":
        mix_BxHxTxT = mix_BxHxTxT / _position_gain(t, mix_BxHxTxT.dtype)
    return mix_BxHxTxT + causal_uniform(t, mix_BxHxTxT.dtype)


def causal_probs(q_BxTxHxK, k_BxTxHxK, scale: float, remove_gap: bool, mode: str = "uniform"):
    """Post-softmax causal attention A_BxHxTxT in fp32, centred by `centre(A, mode)` if remove_gap."""
    t = q_BxTxHxK.shape[1]
    logits = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK,
                        preferred_element_type=jnp.float32) * scale
    mask_TxT = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask_TxT, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if remove_gap:
        probs = centre(probs, mode)
    return probs


def fused_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale: float, impl: str = "auto"):
    """Causal softmax attention through jax.nn.dot_product_attention.

    impl "auto": cuDNN's fused flash kernel on GPU for 16-bit inputs (jax's own None still
    means XLA), falling back to XLA where cuDNN refuses the shapes (it checks them while
    tracing); XLA elsewhere. "xla" / "cudnn" force one ("cudnn" fails where unsupported).
    """
    if impl == "auto":
        if jax.default_backend() == "gpu" and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale=scale,
                                                    is_causal=True, implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError, TypeError):
                pass
        impl = "xla"
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale=scale,
                                        is_causal=True, implementation=impl)


class Attention(nn.Module):
    """Base of every kind: causal attention over `qkv()` and the output projection W_O."""
    cfg: ModelConfig
    kind_name = "base"

    # Per-kind contract --------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Raises ConfigError naming the field when the kind cannot be built."""

    @classmethod
    def kv_cache_elems_per_token(cls, cfg: ModelConfig) -> int:
        """Cached elements per token per layer at inference."""
        raise NotImplementedError

    @classmethod
    def details(cls, cfg: ModelConfig) -> str:
        """Kind-specific sizes for `describe`, e.g. " (kv latent 384)"."""
        return ""

    @classmethod
    def qk_maps(cls, cfg: ModelConfig, params):
        """Effective maps W_Q, W_K [D,H,K] from the block input to each head's query and key.

        Rotary dims are taken at relative offset 0 (the rotation is the identity), so for
        positions all 0, q = x W_Q and k = x W_K head by head; a shared key is repeated per
        head. `params` is one layer's attention params (boxed or not); fp32, HIGHEST precision.
        """
        raise NotImplementedError

    @classmethod
    def spectral_matrices(cls, cfg: ModelConfig) -> tuple[SpectralMatrix, ...]:
        """Every matrix the spectral diagnostics can analyse for this kind: which qk dims, per
        head or per layer, structural rank, the factor chain of its init law (or None: sampled).
        The defaults are the gauge-invariant ones (docs/spectral.md)."""
        raise NotImplementedError

    @property
    def qk_dim(self) -> int:
        """Width of a query/key head; the softmax scale is qk_dim^-1/2."""
        return self.cfg.d_head

    def qkv(self, x_BxTxD, positions_BxT):
        """Returns q_BxTxHxK, k_BxTxGxK, v_BxTxGxK with G dividing H (G key/value heads)."""
        raise NotImplementedError

    # Shared pieces ------------------------------------------------------------------------
    def weight(self, name, shape, axes, fan_in):
        """A parameter with logical axis names (for sharding) in param_dtype, cast for compute."""
        w = self.param(name, nn.with_logical_partitioning(dense_init(fan_in), axes),
                       shape, self.cfg.params_dtype)
        return jnp.asarray(w, self.cfg.compute_dtype)

    def rotate(self, x_BxTxHxK, positions_BxT, rope_dims=None):
        rope_dims = self.cfg.rope_dims if rope_dims is None else rope_dims
        return rope.rotate(x_BxTxHxK, positions_BxT, rope_dims, self.cfg.rope_theta)

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, capture: bool = False):
        cfg = self.cfg
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self.qkv(x_BxTxD, positions_BxT)
        scale = self.qk_dim ** -0.5
        if cfg.remove_gap or capture:
            groups = cfg.num_heads // k_BxTxGxK.shape[2]
            k_BxTxHxK = jnp.repeat(k_BxTxGxK, groups, axis=2)
            v_BxTxHxK = jnp.repeat(v_BxTxGxK, groups, axis=2)
            probs_BxHxTxT = causal_probs(q_BxTxHxK, k_BxTxHxK, scale, cfg.remove_gap,
                                          cfg.remove_gap_mode)
            if capture:
                self.sow("intermediates", "probs_BxHxTxT", probs_BxHxTxT)
            out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxT.astype(v_BxTxHxK.dtype),
                                     v_BxTxHxK)
        else:
            out_BxTxHxK = fused_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale,
                                          cfg.attention_impl)
        h, kv = out_BxTxHxK.shape[2:]
        w_o = self.weight("w_o", (h, kv, cfg.d_model), ("heads", "head_dim", "embed"), h * kv)
        return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, w_o)


@register("mha")
class MultiHeadAttention(Attention):
    """LLaMA attention: H query heads and G key/value heads (G = H here), partial rotary."""

    @classmethod
    def kv_heads(cls, cfg: ModelConfig) -> int:
        return cfg.num_heads

    @classmethod
    def kv_cache_elems_per_token(cls, cfg: ModelConfig) -> int:
        return 2 * cls.kv_heads(cfg) * cfg.d_head

    @classmethod
    def spectral_matrices(cls, cfg: ModelConfig):
        # W_K's G heads are repeated to H: a deterministic repeat, left out of the chains.
        return chain_matrices(cfg, (0, cfg.d_head), key_groups=cls.kv_heads(cfg))

    @classmethod
    def qk_maps(cls, cfg: ModelConfig, params):
        p = _f32(params)
        groups = cfg.num_heads // cls.kv_heads(cfg)
        return p["w_q"], jnp.repeat(p["w_k"], groups, axis=1)

    def qkv(self, x_BxTxD, positions_BxT):
        cfg = self.cfg
        d, h, g, k = cfg.d_model, cfg.num_heads, self.kv_heads(cfg), cfg.d_head
        w_q = self.weight("w_q", (d, h, k), ("embed", "heads", "head_dim"), d)
        w_k = self.weight("w_k", (d, g, k), ("embed", "kv_heads", "head_dim"), d)
        w_v = self.weight("w_v", (d, g, k), ("embed", "kv_heads", "head_dim"), d)
        q = jnp.einsum("btd,dhk->bthk", x_BxTxD, w_q)
        key = jnp.einsum("btd,dhk->bthk", x_BxTxD, w_k)
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, w_v)
        return self.rotate(q, positions_BxT), self.rotate(key, positions_BxT), v


@register("gqa")
class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention: num_kv_heads key/value heads shared by groups of query heads."""

    @classmethod
    def kv_heads(cls, cfg: ModelConfig) -> int:
        return cfg.num_kv_heads

    @classmethod
    def details(cls, cfg: ModelConfig) -> str:
        return f" ({cfg.num_kv_heads} kv heads)"

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if cfg.num_kv_heads <= 0 or cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"config.model.attention.num_kv_heads: {cfg.num_kv_heads} must be a "
                              f"positive divisor of num_heads={cfg.num_heads}")


class LatentAttention(Attention):
    """What the MLA kinds share: the latents c_Q, c_KV and per-head up-projections.

    c_KV = x W_DKV (d_model -> kv_latent_dim); c_Q = x W_DQ (d_model -> q_latent_dim), or
    c_Q = x when q_latent_dim == 0 (no query compression; the up-projections then read x).
    """

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if not 0 < cfg.kv_latent_dim <= cfg.d_model:
            raise ConfigError(f"config.model.attention.kv_latent_dim: {cfg.kv_latent_dim} must lie in "
                              f"[1, d_model={cfg.d_model}] (a latent no wider than its input)")
        if not 0 <= cfg.q_latent_dim <= cfg.d_model:
            raise ConfigError(f"config.model.attention.q_latent_dim: {cfg.q_latent_dim} must lie in "
                              f"[0, d_model={cfg.d_model}] (0 = no query compression)")

    @classmethod
    def details(cls, cfg: ModelConfig) -> str:
        q = cfg.q_latent_dim or "none"
        return f" (kv latent {cfg.kv_latent_dim}, q latent {q})"

    @classmethod
    def q_chain(cls, cfg: ModelConfig) -> tuple[int, ...]:
        """Dims of the query path's factors after the input: (q_latent,) or () uncompressed."""
        return (cfg.q_latent_dim,) if cfg.q_latent_dim else ()

    @classmethod
    def latent_maps(cls, cfg: ModelConfig, params):
        """(p, q_map, kv_map): fp32 params and w -> (x -> c_Q) w, w -> (x -> c_KV) w."""
        p = _f32(params)
        q_map = (lambda w: _mm(p["w_dq"], w)) if cfg.q_latent_dim else (lambda w: w)
        return p, q_map, lambda w: _mm(p["w_dkv"], w)

    def latent_q(self, x_BxTxD):
        """Returns c_Q and the logical axis name of its last dim."""
        cfg = self.cfg
        if cfg.q_latent_dim == 0:
            return x_BxTxD, "embed"
        w_dq = self.weight("w_dq", (cfg.d_model, cfg.q_latent_dim), ("embed", "q_latent"), cfg.d_model)
        return x_BxTxD @ w_dq, "q_latent"

    def latent_kv(self, x_BxTxD):
        cfg = self.cfg
        w_dkv = self.weight("w_dkv", (cfg.d_model, cfg.kv_latent_dim), ("embed", "kv_latent"),
                            cfg.d_model)
        return x_BxTxD @ w_dkv

    def up(self, name, c_BxTxC, c_axis, width, width_axis="head_dim"):
        """Per-head up-projection c W^h: [C] -> [H, width], variance 1/C at init."""
        c = c_BxTxC.shape[-1]
        w = self.weight(name, (c, self.cfg.num_heads, width), (c_axis, "heads", width_axis), c)
        return jnp.einsum("btc,chk->bthk", c_BxTxC, w)


@register("mla_prerope")
class PreRopeLatentAttention(LatentAttention):
    """MLA with rotary on the compressed path: RoPE on the up-projected heads of the latents.

    q_h = RoPE(c_Q W_UQ^h), k_h = RoPE(c_KV W_UK^h) on their first rope_dims dims, v_h = c_KV W_UV^h.
    This is our reading of the MLA paper's MLA-PreRoPE ("rotary applied before compression",
    i.e. on the compressed path, with no separate rotary branch); the paper's text does not
    pin it down, so it is not verifiable. Position enters every head through the shared
    latent, and W_UK cannot be absorbed into the query: the logit
    c_Q,t W_UQ^h R_(s-t) W_UK^hT c_KV,s^T has a rotation that depends on s - t between the two
    up-projections. (Rotating x or the latent itself before an up-projection would not keep
    logits a function of s - t, since the rotation does not commute with W_UK^h.)

    KV cache per token per layer: kv_latent_dim elements (the latent c_KV only). At decode the
    cached latent is re-expanded through W_UK (and W_UV) and the keys re-rotated each step:
    the smallest cache, paid for in compute. Caching the rotated keys instead would cost
    H*d_head + kv_latent_dim; we count the latent.
    """

    @classmethod
    def kv_cache_elems_per_token(cls, cfg: ModelConfig) -> int:
        return cfg.kv_latent_dim

    @classmethod
    def spectral_matrices(cls, cfg: ModelConfig):
        return chain_matrices(cfg, (0, cfg.d_head), cls.q_chain(cfg), (cfg.kv_latent_dim,))

    @classmethod
    def qk_maps(cls, cfg: ModelConfig, params):
        p, q_map, kv_map = cls.latent_maps(cfg, params)
        return q_map(p["w_uq"]), kv_map(p["w_uk"])

    def qkv(self, x_BxTxD, positions_BxT):
        k = self.cfg.d_head
        c_q, q_axis = self.latent_q(x_BxTxD)
        c_kv = self.latent_kv(x_BxTxD)
        q_BxTxHxK = self.up("w_uq", c_q, q_axis, k)
        k_BxTxHxK = self.up("w_uk", c_kv, "kv_latent", k)
        v_BxTxHxK = self.up("w_uv", c_kv, "kv_latent", k)
        return self.rotate(q_BxTxHxK, positions_BxT), self.rotate(k_BxTxHxK, positions_BxT), v_BxTxHxK


@register("mla_decoupled")
class DecoupledLatentAttention(LatentAttention):
    """DeepSeek-V2 MLA: content dims from the latents, rotary dims in a separate, shared-key branch.

    d_R = rope_dims, d_C = d_head - d_R. Per head q_h = [RoPE(c_Q W_QR^h) ; c_Q W_UQ^h] and
    k_h = [RoPE(x W_KR) ; c_KV W_UK^h]: ONE rotary key k^R in R^{d_R} per token, computed from
    the layer input and shared by all heads. Rotary dims come FIRST, as in every other kind
    (the paper writes [q^C; q^R]; the order does not change the logits). v_h = c_KV W_UV^h.
    Scale 1/sqrt(d_C + d_R) = 1/sqrt(d_head), so the base class's fused path applies, with k^R
    broadcast to the H heads. f = 0 drops the rotary branch (NoPE), f = 1 the content q/k.

    KV cache per token per layer: kv_latent_dim + d_R (the latent and the shared rotary key;
    W_UK absorbs into the query and W_UV into W_O, so nothing else needs caching).
    """

    @classmethod
    def kv_cache_elems_per_token(cls, cfg: ModelConfig) -> int:
        return cfg.kv_latent_dim + cfg.rope_dims

    @classmethod
    def details(cls, cfg: ModelConfig) -> str:
        shared = f", one shared rotary key of {cfg.rope_dims}" if cfg.rope_dims else ""
        return f" (kv latent {cfg.kv_latent_dim}, q latent {cfg.q_latent_dim or 'none'}{shared})"

    @classmethod
    def spectral_matrices(cls, cfg: ModelConfig):
        """The rotary branch (dims [0, d_R), one shared key: a single key group) and the content
        branch (dims [d_R, K), keys through the kv latent) are chains. With both present, the
        whole head concatenates them: not one chain, so its null law is sampled; its rank is
        that of [W_Q^R | W_Q^C] against [W_KR | W_DKV W_UK]. The cross-Grams of the branches
        stay available by name (qk_gram_rope, qk_gram_content)."""
        d, c, h, k, q = cfg.d_model, cfg.kv_latent_dim, cfg.num_heads, cfg.d_head, cls.q_chain(cfg)
        d_r, d_c = cfg.rope_dims, cfg.d_head - cfg.rope_dims
        rope = chain_matrices(cfg, (0, d_r), q, (), key_groups=1, suffix="_rope") if d_r else ()
        content = chain_matrices(cfg, (d_r, k), q, (c,), suffix="_content") if d_c else ()
        if not (d_r and d_c):     # one branch: the whole head is that branch's chain
            return tuple(dataclasses.replace(m, name=m.name.rsplit("_", 1)[0]) for m in rope + content)
        rank_q = lambda width: min(d, *q, width)                       # [W_Q^R | W_Q^C] stacked
        rank_k = lambda heads: min(d, d_r + min(c, heads * d_c))       # [W_KR | W_DKV W_UK]
        whole = (SpectralMatrix("qk_circuit", (0, k), "circuit", min(rank_q(k), rank_k(1)), None, h, True),
                 SpectralMatrix("qk_circuit_sum", (0, k), "sum",
                                min(rank_q(d_r + h * d_c), rank_k(h)), None, h, True),
                 SpectralMatrix("qk_gram", (0, k), "gram", min(rank_q(h * k), rank_k(h)), None, h, False))
        return whole + rope + content

    @classmethod
    def qk_maps(cls, cfg: ModelConfig, params):
        p, q_map, kv_map = cls.latent_maps(cfg, params)
        h, d_r = cfg.num_heads, cfg.rope_dims
        q_parts, k_parts = [], []
        if d_r:
            q_parts.append(q_map(p["w_qr"]))
            k_parts.append(jnp.broadcast_to(p["w_kr"][:, None, :], (cfg.d_model, h, d_r)))
        if cfg.d_head > d_r:
            q_parts.append(q_map(p["w_uq"]))
            k_parts.append(kv_map(p["w_uk"]))
        return jnp.concatenate(q_parts, axis=-1), jnp.concatenate(k_parts, axis=-1)

    def qkv(self, x_BxTxD, positions_BxT):
        cfg = self.cfg
        b, t, d = x_BxTxD.shape
        d_r, d_c, h = cfg.rope_dims, cfg.d_head - cfg.rope_dims, cfg.num_heads
        c_q, q_axis = self.latent_q(x_BxTxD)
        c_kv = self.latent_kv(x_BxTxD)
        q_parts, k_parts = [], []
        if d_r:
            q_r_BxTxHxR = self.up("w_qr", c_q, q_axis, d_r, "rope_dim")
            w_kr = self.weight("w_kr", (d, d_r), ("embed", "rope_dim"), d)
            k_r_BxTx1xR = (x_BxTxD @ w_kr)[:, :, None, :]
            q_parts.append(self.rotate(q_r_BxTxHxR, positions_BxT))
            k_parts.append(jnp.broadcast_to(self.rotate(k_r_BxTx1xR, positions_BxT), (b, t, h, d_r)))
        if d_c:
            q_parts.append(self.up("w_uq", c_q, q_axis, d_c))
            k_parts.append(self.up("w_uk", c_kv, "kv_latent", d_c))
        v_BxTxHxK = self.up("w_uv", c_kv, "kv_latent", cfg.d_head)
        return jnp.concatenate(q_parts, axis=-1), jnp.concatenate(k_parts, axis=-1), v_BxTxHxK
