"""A frozen, validated view of `config.model` that modules can hold as a field.

Validation runs here, before any array is built, so a bad config fails with the
name of the field instead of a shape error deep inside compilation.
"""
import dataclasses
from typing import Callable

import ml_collections

# dtype names; jax is imported only where an array type is needed, so that reading a config
# (the launch recipes, --list_trials) does not import it.
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field has a value the model cannot be built with."""


# The checks of each attention kind's own fields, by kind name. mla_rmt.attention registers
# every kind's check_config here, since it imports this module (and this module not it).
KIND_CHECKS: dict[str, Callable[["ModelConfig"], None]] = {}
GAP_MODES = ("uniform", "scaled")   # model.attention.remove_gap_mode
ATTENTION = {"section": "attention"}  # field metadata: the field lives in config.model.attention


def _attention(default):
    return dataclasses.field(default=default, metadata=ATTENTION)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model fields with their defaults; presets.base_config's `model` section is built
    from them (default_config), and from_config reads them back, so each is declared here once."""
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_head: int = 32
    mlp_dim: int = 384
    vocab_size: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"          # compute dtype of activations and matmuls
    param_dtype: str = "float32"     # storage dtype of parameters and optimizer state
    remat: bool = False              # rematerialise each layer in the backward pass
    scan_unroll: int = 0             # layers per iteration of the layer scan; 0 = all of them: no
                                     # loop, which on a GPU runs faster (BENCHMARKS.md), while
                                     # params keep their stacked [layers, ...] layout either way
    attention_impl: str = "auto"     # "auto" | "xla" | "cudnn": fused kernel where the kind allows
    kind: str = _attention("mha")            # registered in mla_rmt.attention
    rope_fraction: float = _attention(1.0)   # share f of each head's q/k dims that carry rotary
                                             # (0 = NoPE)
    num_kv_heads: int = _attention(0)        # gqa: key/value heads (0 = num_heads)
    q_latent_dim: int = _attention(0)        # mla: query latent width (0 = no query compression)
    kv_latent_dim: int = _attention(0)       # mla: key/value latent width (0 = d_model // 2)
    remove_gap: bool = _attention(False)     # centred causal attention (docs/spectral.md,
                                             # "Causal centring")
    remove_gap_mode: str = _attention("uniform")  # with remove_gap: "uniform" A - U, "scaled"
                                                  # diag(i/T)(A - U)

    @classmethod
    def default_config(cls, model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
        """config.model's fields (attention ones under config.model.attention) with their
        defaults, in declaration order, added to `model` (a new ConfigDict if None)."""
        model = ml_collections.ConfigDict() if model is None else model
        for f in dataclasses.fields(cls):
            section = model
            if f.metadata.get("section") == "attention":
                if "attention" not in model:
                    model.attention = ml_collections.ConfigDict()
                section = model.attention
            section[f.name] = f.default
        return model

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
        """The validated view of config.model; a zero scan_unroll, num_kv_heads or kv_latent_dim
        stands for its default (num_layers, num_heads, d_model // 2)."""
        values = {}
        for f in dataclasses.fields(cls):
            section = model.attention if f.metadata.get("section") == "attention" else model
            values[f.name] = f.type(section[f.name])
        values["scan_unroll"] = values["scan_unroll"] or values["num_layers"]
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        values["kv_latent_dim"] = values["kv_latent_dim"] or values["d_model"] // 2
        cfg = cls(**values)
        cfg.validate()
        return cfg

    # Derived sizes -------------------------------------------------------------------------
    @property
    def rope_dims(self) -> int:
        """Rotary dims per query/key head: round(f * d_head)."""
        return int(round(self.rope_fraction * self.d_head))

    @property
    def compute_dtype(self):
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (see _DTYPES)
        return getattr(jnp, self.dtype)

    @property
    def params_dtype(self):
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (see _DTYPES)
        return getattr(jnp, self.param_dtype)

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
        need(self.remove_gap_mode in GAP_MODES, "model.attention.remove_gap_mode",
             f"must be one of {GAP_MODES}, got {self.remove_gap_mode!r}")
        # Kind-specific checks live with the kind, so a new kind brings its own.
        need(self.kind in KIND_CHECKS, "model.attention.kind",
             f"unknown attention kind {self.kind!r}; registered kinds: {sorted(KIND_CHECKS)}")
        KIND_CHECKS[self.kind](self)
