"""Rotary position embedding on the first `rope_dims` dims of each head (partial rotary)."""
import jax.numpy as jnp


def rotate(x_BxTxHxK, positions_BxT, rope_dims: int, theta: float):
    """Rotates dims [0, rope_dims) of every head by position; the rest pass through.

    Pairs (i, i + rope_dims/2) are rotated by angle position * theta^(-2i/rope_dims)
    (the rotate-half layout), so logits depend only on the offset between positions.
    """
    if rope_dims == 0:
        return x_BxTxHxK
    half = rope_dims // 2
    inv_freq_R = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_R
    cos_BxTx1xR = jnp.cos(angle_BxTxR)[:, :, None, :]
    sin_BxTx1xR = jnp.sin(angle_BxTxR)[:, :, None, :]
    x_rot = x_BxTxHxK[..., :rope_dims].astype(jnp.float32)
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = jnp.concatenate([x1 * cos_BxTx1xR - x2 * sin_BxTx1xR,
                               x2 * cos_BxTx1xR + x1 * sin_BxTx1xR], axis=-1)
    return jnp.concatenate([rotated.astype(x_BxTxHxK.dtype), x_BxTxHxK[..., rope_dims:]], axis=-1)
