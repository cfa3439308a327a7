"""The next-token loss: plain cross-entropy, and the chunked one-pass kernel that never holds
the whole batch's logits (a custom VJP computes both gradients while each chunk is live)."""
import functools

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxTxV, targets_BxT):
    """Mean next-token cross-entropy in fp32 (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def loss_chunks(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """How many sequence chunks the chunked loss uses: the fewest that divide seq_len and hold
    at most chunk_tokens tokens each (batch x chunk length); seq_len when none is that small."""
    return next((n for n in range(1, seq_len + 1)
                 if seq_len % n == 0 and batch * (seq_len // n) <= chunk_tokens), seq_len)


def _chunk_pieces(x_BxTxD, targets_BxT, num_chunks):
    """[n, B, T/n, ...] views of the inputs, chunked along the sequence (the batch axis, which
    is the sharded one, stays whole in every chunk)."""
    b, t = targets_BxT.shape
    c = t // num_chunks
    x_NxBxCxD = jnp.moveaxis(x_BxTxD.reshape(b, num_chunks, c, -1), 1, 0)
    targets_NxBxC = jnp.moveaxis(targets_BxT.reshape(b, num_chunks, c), 1, 0)
    return x_NxBxCxD, targets_NxBxC


def _chunk_logits(x_BxCxD, head_DxV):
    """Logits of one chunk in the compute dtype, as the plain path rounds them; every consumer
    widens them to fp32 itself, so no fp32 copy of the logits is ever written."""
    return jnp.einsum("bcd,dv->bcv", x_BxCxD, head_DxV)


def logsumexp_one_pass(logits_BxV):
    """log sum_v exp(logits) over the last axis in fp32, reading the logits once.

    A reduction over (running max m, sum s of exp(x - m)) pairs: one pass over the vocabulary
    instead of jax.nn.logsumexp's max pass then sum pass (the logits of a chunk are the largest
    array of the step, and this is a third of the loss's memory traffic). Two pairs merge with
    one exp: the smaller max's sum is scaled by e = exp(-|m - m'|) before the two are added.
    """
    x = logits_BxV.astype(jnp.float32)

    def merge(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        gap = m_b - m_a
        e = jnp.exp(-jnp.abs(gap))
        return jnp.maximum(m_a, m_b), jnp.where(gap > 0, s_a * e + s_b, s_a + s_b * e)

    # A finite start: gaps are never -inf - -inf (nan); an -inf logit adds exp(-inf) = 0.
    start = (jnp.float32(jnp.finfo(jnp.float32).min), jnp.float32(0.0))
    max_B, sum_B = jax.lax.reduce((x, jnp.ones_like(x)), start, merge, (x.ndim - 1,))
    return max_B + jnp.log(sum_B)


def _chunk_loss_sum(logits_BxCxV, targets_BxC, one_pass):
    lse_BxC = (logsumexp_one_pass(logits_BxCxV) if one_pass
               else jax.nn.logsumexp(logits_BxCxV.astype(jnp.float32), axis=-1))
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return jnp.sum(lse_BxC - target_BxC.astype(jnp.float32)), lse_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_ce(x_BxTxD, head_DxV, targets_BxT, num_chunks, one_pass):
    x_NxBxCxD, targets_NxBxC = _chunk_pieces(x_BxTxD, targets_BxT, num_chunks)
    head_c = head_DxV.astype(x_BxTxD.dtype)

    def body(total, chunk):
        x_BxCxD, targets_BxC = chunk
        loss_sum, _ = _chunk_loss_sum(_chunk_logits(x_BxCxD, head_c), targets_BxC, one_pass)
        return total + loss_sum, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NxBxCxD, targets_NxBxC))
    return total / targets_BxT.size


def _chunked_ce_fwd(x_BxTxD, head_DxV, targets_BxT, num_chunks, one_pass):
    """The loss and both gradients in one pass over the chunks: each chunk's logits are made,
    used for the loss and for d(loss)/d(logits), and dropped; the backward pass only scales."""
    b, t = targets_BxT.shape
    inv_count = 1.0 / targets_BxT.size
    x_NxBxCxD, targets_NxBxC = _chunk_pieces(x_BxTxD, targets_BxT, num_chunks)
    head_c = head_DxV.astype(x_BxTxD.dtype)

    def body(carry, chunk):
        total, dhead_DxV = carry
        x_BxCxD, targets_BxC = chunk
        logits_BxCxV = _chunk_logits(x_BxCxD, head_c)
        loss_sum, lse_BxC = _chunk_loss_sum(logits_BxCxV, targets_BxC, one_pass)
        probs_BxCxV = jnp.exp(logits_BxCxV.astype(jnp.float32) - lse_BxC[..., None])
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2) == targets_BxC[..., None]
        # d(mean loss)/d(logits), rounded to the compute dtype as the plain path's cotangent is
        dlogits_BxCxV = ((jnp.where(is_target, probs_BxCxV - 1.0, probs_BxCxV)) * inv_count
                         ).astype(x_BxCxD.dtype)
        dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, head_c,
                              preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
        dhead_DxV = dhead_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                           preferred_element_type=jnp.float32)
        return (total + loss_sum, dhead_DxV), dx_BxCxD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_DxV.shape, jnp.float32))
    (total, dhead_DxV), dx_NxBxCxD = jax.lax.scan(body, init, (x_NxBxCxD, targets_NxBxC))
    dx_BxTxD = jnp.moveaxis(dx_NxBxCxD, 0, 1).reshape(b, t, -1)
    return total * inv_count, (dx_BxTxD, dhead_DxV.astype(head_DxV.dtype))


def _chunked_ce_bwd(num_chunks, one_pass, residuals, g):
    del num_chunks, one_pass
    dx_BxTxD, dhead_DxV = residuals
    return (dx_BxTxD * g.astype(dx_BxTxD.dtype), dhead_DxV * g.astype(dhead_DxV.dtype), None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(x_BxTxD, head_DxV, targets_BxT, chunk_tokens: int = 8192,
                          one_pass: bool = False):
    """cross_entropy(x @ head, targets) without the whole batch's logits: the LM head, the
    log-sum-exp and the gradients run over sequence chunks of at most chunk_tokens tokens
    under lax.scan, so at most one chunk's logits exist at a time.

    A custom VJP computes d/dx and d/dhead while each chunk's logits are live (the backward
    pass only scales them), so nothing is recomputed, unlike jax.checkpoint around the chunk:
    the head's matmul FLOPs are the plain path's. The head's gradient accumulates in fp32.
    Numerics are the plain path's: logits and their cotangent rounded to the compute dtype,
    log-sum-exp and softmax in fp32; with one_pass, the log-sum-exp reads the logits once
    (logsumexp_one_pass: fewer bytes, more arithmetic; BENCHMARKS.md).
    """
    b, t = targets_BxT.shape
    with jax.named_scope("cross_entropy"):
        return _chunked_ce(x_BxTxD, head_DxV, targets_BxT, loss_chunks(b, t, chunk_tokens),
                           one_pass)


def batch_loss(params, batch, *, model, loss_chunk_tokens: int = 0, loss_one_pass: bool = False):
    """Mean next-token loss of a batch; chunked over the sequence when loss_chunk_tokens > 0."""
    if loss_chunk_tokens > 0:
        x_BxTxD, head_DxV = model.apply({"params": params}, batch["inputs"], return_hidden=True)
        return chunked_cross_entropy(x_BxTxD, head_DxV, batch["targets"], loss_chunk_tokens,
                                     loss_one_pass)
    return cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])
