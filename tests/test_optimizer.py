"""mla_rmt/optimizer.py: the warmup-cosine schedule and the weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np

from mla_rmt import optimizer as optimizer_lib, presets
from mla_rmt.model import Transformer
from mla_rmt.model_config import ModelConfig


def test_learning_rate_schedule_warmup_then_cosine():
    config = presets.base_config()
    o = config.optim
    o.learning_rate, o.warmup_steps, o.min_lr_ratio = 1e-3, 10, 0.1
    schedule = optimizer_lib.learning_rate_schedule(o, 110)
    for step in (0, 5, 10, 60, 110):
        if step <= 10:
            want = 1e-3 * step / 10
        else:
            progress = (step - 10) / 100
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9)

def test_weight_decay_skips_norm_scales():
    config = presets.base_config()
    cfg = ModelConfig.from_config(config.model)
    params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mask = optimizer_lib.decay_mask(params)  # pylint: disable=protected-access
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert not any(v for k, v in flat.items() if "scale" in k)
    assert all(v for k, v in flat.items() if "w_q" in k or "lm_head" in k or "embed']" in k)
