"""The benchmarked step's config and its variants, shared by bench/profile_step.py (which times
it) and bench/gpu_traffic.py (which counts its bytes): `base` is bench/throughput.py's config of
a kind, and a variant overrides dotted fields, e.g. `train.microbatch_size=256,train.loss_one_pass=False`."""
from bench import throughput

STEP_FIELDS = ("preset", "seq", "batch", "microbatch", "rope_fraction", "kv_latent_dim",
               "attention_impl", "loss_chunk_tokens", "remat")


def add_step_args(args, tiny: bool = False):
    """Copies bench/throughput.py's step settings (its defaults, or --tiny's) onto args."""
    base = throughput.parse_args(["--tiny"] if tiny else [])
    for key in STEP_FIELDS:
        setattr(args, key, getattr(base, key))
    return args


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def variant_config(args, spec: str):
    from mla_rmt import sweep  # pylint: disable=import-outside-toplevel
    config = throughput.jax_config(args, args.kind, 0, "")
    if spec == "base":
        return config
    overrides = dict(item.split("=", 1) for item in spec.split(","))
    return sweep.apply(config, {k.strip(): parse_value(v.strip()) for k, v in overrides.items()})


def compile_step(config, mesh, trainer):
    """The trainer's plain step compiled ahead of time for the config's global batch on the mesh."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from mla_rmt import sharding  # pylint: disable=import-outside-toplevel
    batch = jax.ShapeDtypeStruct((config.data.global_batch_size, config.data.seq_len), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    return trainer.train_step.lower(trainer.abstract_state,
                                    {"inputs": batch, "targets": batch}).compile()
