"""A frozen, validated view of `config.model` that modules can hold as a field.

Validation runs here, before any array is built, so a bad config fails with the
name of the field instead of a shape error deep inside compilation.
"""
import dataclasses

import jax.numpy as jnp
import ml_collections

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config field has a value the model cannot be built with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    d_model: int
    num_heads: int
    d_head: int
    mlp_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    dtype: str
    param_dtype: str
    remat: bool
    scan_unroll: int
    attention_impl: str
    kind: str
    rope_fraction: float
    num_kv_heads: int
    q_latent_dim: int
    kv_latent_dim: int
    remove_gap: bool
    remove_gap_mode: str = "uniform"

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
        a = model.attention
        cfg = cls(
            num_layers=int(model.num_layers), d_model=int(model.d_model),
            num_heads=int(model.num_heads), d_head=int(model.d_head), mlp_dim=int(model.mlp_dim),
            vocab_size=int(model.vocab_size), rope_theta=float(model.rope_theta),
            norm_eps=float(model.norm_eps), dtype=str(model.dtype),
            param_dtype=str(model.param_dtype), remat=bool(model.remat),
            scan_unroll=int(model.get("scan_unroll", 0)) or int(model.num_layers),
            attention_impl=str(model.attention_impl), kind=str(a.kind),
            rope_fraction=float(a.rope_fraction),
            num_kv_heads=int(a.num_kv_heads) or int(model.num_heads),
            q_latent_dim=int(a.q_latent_dim),
            kv_latent_dim=int(a.kv_latent_dim) or int(model.d_model) // 2,
            remove_gap=bool(a.remove_gap),
            remove_gap_mode=str(a.get("remove_gap_mode", "uniform")))
        cfg.validate()
        return cfg

    # Derived sizes -------------------------------------------------------------------------
    @property
    def rope_dims(self) -> int:
        """Rotary dims per query/key head: round(f * d_head)."""
        return int(round(self.rope_fraction * self.d_head))

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def validate(self) -> None:
        def need(ok, field, msg):
            if not ok:
                raise ConfigError(f"config.{field}: {msg}")

        for f in ("num_layers", "d_model", "num_heads", "d_head", "mlp_dim", "vocab_size"):
            need(getattr(self, f) > 0, f"model.{f}", f"must be positive, got {getattr(self, f)}")
        need(self.d_model % self.num_heads == 0, "model.d_model",
             f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        need(self.dtype in _DTYPES, "model.dtype", f"unknown dtype {self.dtype!r}; known: {sorted(_DTYPES)}")
        need(self.param_dtype in _DTYPES, "model.param_dtype",
             f"unknown dtype {self.param_dtype!r}; known: {sorted(_DTYPES)}")
        need(1 <= self.scan_unroll <= self.num_layers, "model.scan_unroll",
             f"must be 0 (all layers) or lie in [1, num_layers={self.num_layers}], got {self.scan_unroll}")
        need(self.attention_impl in ("auto", "xla", "cudnn"), "model.attention_impl",
             f"must be 'auto', 'xla' or 'cudnn', got {self.attention_impl!r}")
        need(0.0 <= self.rope_fraction <= 1.0, "model.attention.rope_fraction",
             f"must lie in [0, 1], got {self.rope_fraction}")
        exact = self.rope_fraction * self.d_head
        need(abs(exact - round(exact)) < 1e-6, "model.attention.rope_fraction",
             f"rope_fraction * d_head = {exact} is not a whole number of dims")
        need(self.rope_dims % 2 == 0, "model.attention.rope_fraction",
             f"rotary dims rope_fraction * d_head = {self.rope_dims} must be even "
             "(rotary rotates pairs of dims)")
        # Kind-specific checks live with the kind, so a new kind brings its own.
        from mla_rmt import attention  # pylint: disable=import-outside-toplevel
        need(self.remove_gap_mode in attention.GAP_MODES, "model.attention.remove_gap_mode",
             f"must be one of {attention.GAP_MODES}, got {self.remove_gap_mode!r}")
        attention.validate(self)
