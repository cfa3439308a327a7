"""mla_rmt/loss.py: the chunked one-pass cross-entropy against the plain loss and float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import _relative_error, _tiny_state

from mla_rmt import loss as loss_lib, presets


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_tokens, one_pass", [(16, False), (24, True), (10**6, False)])
def test_chunked_cross_entropy_matches_plain_loss_and_grads(dtype, tol, chunk_tokens, one_pass):
    rng = np.random.default_rng()
    b, t, d, v = 3, 16, 24, 97
    x_BxTxD = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    head_DxV = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)
    targets_BxT = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def plain(x, w):
        return loss_lib.cross_entropy(x @ w.astype(dtype), targets_BxT)

    def chunked(x, w):
        return loss_lib.chunked_cross_entropy(x, w, targets_BxT, chunk_tokens, one_pass)

    assert loss_lib.loss_chunks(b, t, chunk_tokens) == {16: 4, 24: 2, 10**6: 1}[chunk_tokens]
    loss, (gx, gw) = jax.value_and_grad(chunked, argnums=(0, 1))(x_BxTxD, head_DxV)
    ref_loss, (ref_gx, ref_gw) = jax.value_and_grad(plain, argnums=(0, 1))(x_BxTxD, head_DxV)
    assert gx.dtype == dtype and gw.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol / 10)
    np.testing.assert_allclose(float(jax.jit(chunked)(x_BxTxD, head_DxV)), float(loss), rtol=1e-6)
    assert _relative_error(gx, ref_gx) < tol
    assert _relative_error(gw, ref_gw) < tol

@pytest.mark.parametrize("scale", [1.0, 30.0, 3e4])
def test_one_pass_logsumexp_matches_float64(scale):
    rng = np.random.default_rng()
    logits = rng.normal(size=(5, 7, 301)) * scale + rng.normal(size=(5, 7, 1)) * scale
    logits[0, 0, :-1] = -np.inf                    # one finite entry in a row
    logits[1, 2, 5] = -np.inf
    x64 = logits.max(axis=-1, keepdims=True)
    ref = (x64 + np.log(np.exp(logits - x64).sum(axis=-1, keepdims=True)))[..., 0]
    got = jax.jit(loss_lib.logsumexp_one_pass)(jnp.asarray(logits, jnp.float32))
    assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-6, atol=2e-6 * scale)
    bf16 = jnp.asarray(logits, jnp.bfloat16)       # widened inside the reduction
    ref_bf16 = jax.nn.logsumexp(bf16.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(loss_lib.logsumexp_one_pass(bf16), ref_bf16, rtol=2e-6, atol=2e-6 * scale)

def test_loss_chunks_divide_the_sequence_and_respect_the_budget():
    assert loss_lib.loss_chunks(128, 256, 8192) == 4          # 4 chunks of 128 x 64 tokens
    assert loss_lib.loss_chunks(16, 128, 8192) == 1
    assert loss_lib.loss_chunks(4, 6, 8) == 3                  # 3 chunks of 4 x 2
    assert loss_lib.loss_chunks(100, 8, 10) == 8               # never below one position per chunk

@pytest.mark.parametrize("kind, one_pass", [("mha", False), ("mla_decoupled", True)])
def test_chunked_loss_through_the_model_matches_plain(kind, one_pass):
    config = presets.base_config()
    config.model.attention.kind, config.model.attention.rope_fraction = kind, 0.5
    model, _, state, batch = _tiny_state(config)
    grad = jax.jit(jax.value_and_grad(lambda p, chunk: loss_lib.batch_loss(
        p, batch, model=model, loss_chunk_tokens=chunk, loss_one_pass=one_pass)), static_argnums=1)
    ref_loss, ref_grads = grad(state.params, 0)
    loss, grads = grad(state.params, 32)                   # 4 chunks of 8 rows x 4 positions
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        assert _relative_error(g, ref) < 1e-5, jax.tree_util.keystr(path)
