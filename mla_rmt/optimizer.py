"""AdamW with linear warmup and cosine decay, optional global-norm clipping, and weight decay
on matrices only."""
import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of it at num_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
        decay_steps=max(num_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * optim.min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only: norm scales are left alone."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    adamw = optax.adamw(learning_rate_schedule(o, config.train.num_steps), b1=o.b1, b2=o.b2,
                        eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw
