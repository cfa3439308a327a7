"""Rotary position embedding on the first `rope_dims` dims of each head (partial rotary)."""
import jax
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
    return _rotate(x_BxTxHxK, jnp.cos(angle_BxTxR)[:, :, None, :], jnp.sin(angle_BxTxR)[:, :, None, :])


def _rotate_by(x_BxTxHxK, cos_BxTx1xR, sin_BxTx1xR):
    half = cos_BxTx1xR.shape[-1]
    x_rot = x_BxTxHxK[..., :2 * half].astype(jnp.float32)
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = jnp.concatenate([x1 * cos_BxTx1xR - x2 * sin_BxTx1xR,
                               x2 * cos_BxTx1xR + x1 * sin_BxTx1xR], axis=-1)
    return jnp.concatenate([rotated.astype(x_BxTxHxK.dtype), x_BxTxHxK[..., 2 * half:]], axis=-1)


# The gradient of a rotation is the rotation by the opposite angle. Written out, it is one
# elementwise pass like the forward; left to autodiff, the transposed slices and concatenations
# become pads and adds that a GPU runs far below its memory bandwidth (BENCHMARKS.md, "What the
# device's own kernels say").
_rotate = jax.custom_vjp(_rotate_by)


def _rotate_fwd(x_BxTxHxK, cos_BxTx1xR, sin_BxTx1xR):
    return _rotate_by(x_BxTxHxK, cos_BxTx1xR, sin_BxTx1xR), (cos_BxTx1xR, sin_BxTx1xR)


def _rotate_bwd(residuals, grad_BxTxHxK):
    cos_BxTx1xR, sin_BxTx1xR = residuals   # functions of the positions alone: no gradient
    return _rotate_by(grad_BxTxHxK, cos_BxTx1xR, -sin_BxTx1xR), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)
