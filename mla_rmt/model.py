"""LLaMA decoder: token embedding, RMSNorm, swappable attention, SwiGLU MLP, untied LM head.

Layers run under `nn.scan`, so every per-layer parameter has a leading `layers` axis that the
spectral diagnostics batch over. The scan is unrolled by default (`model.scan_unroll`): a
rolled loop makes XLA copy each layer's weights, gradients and saved activations in and out
of the stacked buffers (BENCHMARKS.md, "Where the time goes").
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_rmt import attention
from mla_rmt.model_config import ModelConfig


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                             (x_BxTxD.shape[-1],), self.cfg.params_dtype)
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.cfg.compute_dtype)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down, with W_gate and W_up stored as one (d, 2, f) weight:
    one matmul in, and the backward writes d(gate) and d(up) in one pass over one array."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.mlp_dim

        def weight(name, shape, axes, fan_in):
            w = self.param(name, nn.with_logical_partitioning(attention.dense_init(fan_in), axes),
                           shape, cfg.params_dtype)
            return jnp.asarray(w, cfg.compute_dtype)

        gate_up_BxTx2xF = jnp.einsum("btd,dcf->btcf", x_BxTxD,
                                     weight("w_gate_up", (d, 2, f), ("embed", "gate_up", "mlp"), d))
        hidden_BxTxF = nn.silu(gate_up_BxTx2xF[..., 0, :]) * gate_up_BxTx2xF[..., 1, :]
        return hidden_BxTxF @ weight("w_down", (f, d), ("mlp", "embed"), f)


class Block(nn.Module):
    """Pre-norm residual block; `capture` sows the attention matrix and the layer output."""
    cfg: ModelConfig
    capture: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT):
        attn = attention.get(self.cfg.kind)(self.cfg, name="attention")
        x_BxTxD = x_BxTxD + attn(RMSNorm(self.cfg, name="attention_norm")(x_BxTxD), positions_BxT,
                                 capture=self.capture)
        x_BxTxD = x_BxTxD + SwiGLU(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxTxD))
        if self.capture:
            self.sow("intermediates", "output_BxTxD", x_BxTxD)
        return x_BxTxD, None


class Transformer(nn.Module):
    cfg: ModelConfig
    capture: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, return_hidden: bool = False):
        """logits_BxTxV in the compute dtype; with return_hidden, (x_BxTxD, head_DxV) instead:
        the final-norm output and the LM head as stored (param dtype), for a loss that applies
        the head itself chunk by chunk and never holds the whole batch's logits."""
        cfg = self.cfg
        embed_VxD = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
        x_BxTxD = jnp.take(embed_VxD, tokens_BxT, axis=0).astype(cfg.compute_dtype)
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                         split_rngs={"params": True}, in_axes=nn.broadcast,
                         length=cfg.num_layers, unroll=cfg.scan_unroll,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxTxD, _ = layers(cfg, self.capture, name="layers")(x_BxTxD, positions_BxT)

        x_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)
        head_DxV = self.param("lm_head", nn.with_logical_partitioning(
            attention.dense_init(cfg.d_model), ("embed", "vocab")),
            (cfg.d_model, cfg.vocab_size), cfg.params_dtype)
        if return_hidden:
            return x_BxTxD, head_DxV
        return x_BxTxD @ head_DxV.astype(cfg.compute_dtype)  # logits_BxTxV


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the whole model, from shapes alone."""
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (incl. the LM head) + 12 x L x T x d_model.

    The matmul parameters are all but the embedding table and the norm scales; the second
    term counts the attention scores and the weighted sum of values (forward + backward).
    """
    norm_params = (2 * cfg.num_layers + 1) * cfg.d_model
    matmul_params = param_count(cfg) - cfg.vocab_size * cfg.d_model - norm_params
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * seq_len * cfg.d_model
