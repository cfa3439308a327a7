"""Hugging Face-layout checkpoints (config.json + *.safetensors) <-> this project's attention params.

Two families are read, layer by layer (only one layer's attention tensors are in host memory
at a time), and mapped onto an attention kind's parameter tree, so that the kind's `qk_maps`
gives the checkpoint's effective W_Q / W_K and every spectral matrix is available:

* LLaMA-style (`model_type` llama, mistral, mixtral, qwen2, qwen2_moe): q/k/v/o projections,
  grouped-query heads, partial rotary (`partial_rotary_factor`) -> kind `mha` or `gqa`.
  HF stores W as [out, in] and rotates pairs (i, i + r/2) of the first r dims of a head
  ("rotate_half"), which is this project's layout: the weights are transposed and reshaped,
  nothing is permuted. Biases (Qwen2's q/k/v) are not part of the bilinear form x W_Q W_K^T x'
  and are left out (listed under "ignored" in the output).
* DeepSeek-V2/V3 MLA (`model_type` deepseek_v2, deepseek_v3) -> kind `mla_decoupled`:
  q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set;
  kv_a_proj_with_mqa = [W_DKV ; W_KR] (the latent and the ONE shared rotary key);
  kv_a_layernorm; kv_b_proj = per head [W_UK ; W_UV]; o_proj. The differences, and why the
  logits do not change:
  - A head is [nope ; rope] in DeepSeek and [rope ; content] here: the same permutation of a
    head's dims on q and k leaves every dot product q.k unchanged.
  - DeepSeek rotates interleaved pairs (2i, 2i+1) (`rope_interleave`, true unless the config
    says otherwise); we rotate (i, i + r/2) with the same frequency i. Reordering the rotary
    dims as [0, 2, 4, ..., 1, 3, ...] on q and k turns one into the other exactly.
  - The latent RMSNorms: their weights g are diagonal and fold into the next projection
    (diag(g) W_UQ, diag(g) W_UK, diag(g) W_UV). What remains, 1/rms(c) per token, is a positive
    scalar of the token, not a weight: the effective maps are the layer's at unit latent RMS.
    It scales a whole query (q latent) and a key's content part against its rotary part
    (kv latent); tests/test_hf_checkpoint.py checks the logits with these factors written out.
  - v_head_dim may be smaller than the query/key head (DeepSeek: 128 vs 192): W_UV and W_O
    are padded with zero dims, which leaves the attention output unchanged.
  - FP8 weights with `weight_scale_inv` (DeepSeek-V3) are dequantised block by block.

The reverse, `export`, writes this project's parameters in the same layout (one shard per
layer and an index), so a model trained here and analysed through both paths gives the same
numbers. An mla_decoupled export writes unit latent-norm weights: DeepSeek's forward would
also divide each latent by its RMS, which this kind does not, so the file reproduces the maps
and the diagnostics but not the forward; mla_prerope has no Hugging Face counterpart.
"""
import dataclasses
import json
import pathlib
from typing import Iterator

import ml_collections
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mla_rmt import presets
from mla_rmt.model_config import ConfigError, ModelConfig

LLAMA_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe")
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint this module cannot read; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """An opened checkpoint: its config, the ModelConfig of the matching kind, tensor -> file."""
    directory: pathlib.Path
    hf_config: dict
    family: str                      # "llama" | "deepseek"
    cfg: ModelConfig
    files: dict[str, pathlib.Path]   # tensor name -> safetensors file holding it
    prefix: str                      # tensor names before "layers.N." (e.g. "model.")
    index_source: str                # where `files` came from (for error messages)

    @property
    def config_path(self) -> pathlib.Path:
        return self.directory / "config.json"

    def source(self) -> dict:
        """What the JSON output records about the checkpoint and its mapping."""
        c = self.hf_config
        return {"directory": str(self.directory), "model_type": c.get("model_type"),
                "family": self.family, "kind": self.cfg.kind, "num_layers": self.cfg.num_layers,
                "d_model": self.cfg.d_model, "num_heads": self.cfg.num_heads,
                "d_head": self.cfg.d_head, "rope_dims": self.cfg.rope_dims,
                "num_kv_heads": self.cfg.num_kv_heads, "q_latent_dim": self.cfg.q_latent_dim,
                "kv_latent_dim": self.cfg.kv_latent_dim, "ignored": self.ignored(),
                # Frequencies do not enter the maps (rotary dims are read at offset 0).
                "rope_scaling": c.get("rope_scaling")}

    def ignored(self) -> list[str]:
        """Tensors of layer 0's attention that are read by no map (biases)."""
        stem = f"{self.prefix}layers.0.self_attn."
        return sorted(n for n in self.files if n.startswith(stem) and n.endswith(".bias"))


# Opening ------------------------------------------------------------------------------------

def _field(config: dict, path: pathlib.Path, name: str, kind=int, default=None, required=True):
    value = config.get(name, default)
    if value is None:
        if required:
            raise CheckpointError(f"{path}: field {name!r} is missing")
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: field {name!r} = {value!r} must be {'an integer' if kind is int else 'a number'}") from None
    if kind is int and value < 0:
        raise CheckpointError(f"{path}: field {name!r} = {value} must be >= 0")
    return value


def _rope_theta(config: dict, path: pathlib.Path) -> float:
    nested = config.get("rope_parameters") or {}
    return _field({"rope_theta": config.get("rope_theta", nested.get("rope_theta", 10000.0))},
                  path, "rope_theta", float)


def model_config(hf_config: dict, path: pathlib.Path) -> tuple[str, ModelConfig]:
    """(family, ModelConfig of the matching kind) from a Hugging Face config.json."""
    model_type = hf_config.get("model_type")
    if model_type in LLAMA_TYPES:
        family = "llama"
    elif model_type in DEEPSEEK_TYPES:
        family = "deepseek"
    else:
        raise CheckpointError(f"{path}: field 'model_type' = {model_type!r} is not supported; "
                              f"supported: {', '.join(LLAMA_TYPES + DEEPSEEK_TYPES)}")
    f = lambda name, **kw: _field(hf_config, path, name, **kw)
    d, h = f("hidden_size"), f("num_attention_heads")
    if d <= 0 or h <= 0:
        raise CheckpointError(f"{path}: fields 'hidden_size' = {d} and 'num_attention_heads' = {h} "
                              "must be positive")
    m = presets.base_config().model
    m.num_layers = f("num_hidden_layers")
    m.d_model, m.num_heads = d, h
    m.mlp_dim = f("intermediate_size", required=False) or 1     # not read by the attention maps
    m.vocab_size = f("vocab_size", required=False) or 1
    m.rope_theta = _rope_theta(hf_config, path)
    m.norm_eps = f("rms_norm_eps", kind=float, required=False) or 1e-6
    m.dtype = m.param_dtype = "float32"
    a = m.attention
    if family == "llama":
        m.d_head = f("head_dim", required=False) or d // h
        g = f("num_key_value_heads", required=False) or h
        if h % g:
            raise CheckpointError(f"{path}: field 'num_key_value_heads' = {g} must divide "
                                  f"'num_attention_heads' = {h}")
        factor = f("partial_rotary_factor", kind=float, default=1.0, required=False)
        factor = 1.0 if factor is None else factor
        rope_dims = int(m.d_head * factor)          # as Hugging Face sizes the rotary part
        if not 0.0 <= factor <= 1.0 or rope_dims % 2:
            raise CheckpointError(f"{path}: field 'partial_rotary_factor' = {factor} gives "
                                  f"{rope_dims} rotary dims of head_dim {m.d_head}; need an even "
                                  "number in [0, head_dim]")
        a.kind = "mha" if g == h else "gqa"
        a.num_kv_heads = g
        a.rope_fraction = rope_dims / m.d_head
    else:
        d_c, d_r = f("qk_nope_head_dim"), f("qk_rope_head_dim")
        v = f("v_head_dim")
        m.d_head = d_c + d_r
        if m.d_head == 0 or d_r % 2:
            raise CheckpointError(f"{path}: fields 'qk_nope_head_dim' = {d_c}, 'qk_rope_head_dim' "
                                  f"= {d_r}: need a nonzero head and an even rotary part")
        if v > m.d_head:
            raise CheckpointError(f"{path}: field 'v_head_dim' = {v} is wider than the query/key "
                                  f"head ({m.d_head}); kind mla_decoupled holds values of at most "
                                  "that width")
        a.kind = "mla_decoupled"
        a.rope_fraction = d_r / m.d_head
        a.q_latent_dim = f("q_lora_rank", required=False) or 0
        a.kv_latent_dim = f("kv_lora_rank")
        if a.kv_latent_dim == 0:
            raise CheckpointError(f"{path}: field 'kv_lora_rank' must be positive")
    try:
        return family, ModelConfig.from_config(m)
    except ConfigError as e:
        raise CheckpointError(f"{path}: these fields give a model this project cannot build: {e}") from e


def _tensor_files(directory: pathlib.Path) -> tuple[dict[str, pathlib.Path], str]:
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: field 'weight_map' unreadable ({e!r})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for name, file in files.items():
            if not file.exists():
                raise CheckpointError(f"{index}: 'weight_map' names {file.name} for {name!r}, "
                                      "and no such file exists")
        return files, str(index)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{directory}: no {INDEX} and no *.safetensors file")
    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as f:
            files.update({name: shard for name in f.keys()})
    return files, ", ".join(s.name for s in shards)


def _prefix(files: dict[str, pathlib.Path], family: str, source: str) -> str:
    probe = "layers.0.self_attn." + ("q_proj.weight" if family == "llama" else "kv_a_proj_with_mqa.weight")
    for name in files:
        if name.endswith(probe) and (name == probe or name[-len(probe) - 1] == "."):
            return name[:-len(probe)]
    raise CheckpointError(f"{source}: no tensor '*{probe}': not a {family}-layout checkpoint")


def open_checkpoint(directory) -> HFCheckpoint:
    """Reads config.json and the tensor index (headers only; no weight is loaded)."""
    directory = pathlib.Path(directory)
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: no config.json; --hf expects a Hugging Face model directory")
    try:
        hf_config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    family, cfg = model_config(hf_config, path)
    files, source = _tensor_files(directory)
    return HFCheckpoint(directory, hf_config, family, cfg, files, _prefix(files, family, source), source)


# Reading one layer -----------------------------------------------------------------------------

def _fp8_block(ckpt: HFCheckpoint) -> tuple[int, int]:
    q = ckpt.hf_config.get("quantization_config") or {}
    return tuple(q.get("weight_block_size", (128, 128)))


_FP8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_fp8(file: pathlib.Path, name: str, dtype) -> np.ndarray:
    """One fp8 tensor, read by its header entry (safetensors' numpy loader has no fp8 dtypes):
    the file is an 8-byte header length, a JSON header {name: {shape, data_offsets}}, the data."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))[name]
        start, stop = entry["data_offsets"]
        f.seek(8 + header_len + start)
        return np.frombuffer(f.read(stop - start), dtype).reshape(entry["shape"])


def read_tensor(ckpt: HFCheckpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as float32, checked against the shape the config implies."""
    if name not in ckpt.files:
        raise CheckpointError(f"{ckpt.index_source}: tensor {name!r} is missing "
                              f"(expected by {ckpt.config_path})")
    file = ckpt.files[name]
    with safe_open(str(file), framework="numpy") as f:
        if name not in f.keys():
            raise CheckpointError(f"{file}: tensor {name!r} is missing (listed in {ckpt.index_source})")
        dtype = f.get_slice(name).get_dtype()
        x = _read_fp8(file, name, _FP8[dtype]) if dtype in _FP8 else f.get_tensor(name)
    if tuple(x.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(x.shape)}, but "
                              f"{ckpt.config_path} implies {tuple(shape)}")
    if x.dtype.kind in "biu":
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {x.dtype}; a float weight is "
                              "expected (quantised layouts other than block-scaled fp8 are not read)")
    scale_name = name + "_scale_inv"
    if x.dtype.itemsize == 1 and scale_name in ckpt.files:   # fp8 with block scales
        with safe_open(str(ckpt.files[scale_name]), framework="numpy") as f:
            scale = f.get_tensor(scale_name).astype(np.float32)
        bo, bi = _fp8_block(ckpt)
        scale = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:shape[0], :shape[1]]
        return x.astype(np.float32) * scale
    return x.astype(np.float32)


def _interleaved_to_half(r: int) -> np.ndarray:
    """Dim order that turns interleaved rotary pairs (2i, 2i+1) into rotate-half pairs (i, i+r/2)."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def _interleaved(ckpt: HFCheckpoint) -> bool:
    return bool(ckpt.hf_config.get("rope_interleave", True))


def layer_params(ckpt: HFCheckpoint, layer: int) -> dict[str, np.ndarray]:
    """Layer `layer`'s attention params in the kind's tree (float32 numpy, no layer axis)."""
    cfg = ckpt.cfg
    if not 0 <= layer < cfg.num_layers:
        raise IndexError(f"layer {layer} of a {cfg.num_layers}-layer checkpoint")
    stem = f"{ckpt.prefix}layers.{layer}.self_attn."
    read = lambda n, shape: read_tensor(ckpt, stem + n, shape)
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_head
    if ckpt.family == "llama":
        g = cfg.num_kv_heads
        return {"w_q": read("q_proj.weight", (h * k, d)).T.reshape(d, h, k),
                "w_k": read("k_proj.weight", (g * k, d)).T.reshape(d, g, k),
                "w_v": read("v_proj.weight", (g * k, d)).T.reshape(d, g, k),
                "w_o": read("o_proj.weight", (d, h * k)).T.reshape(h, k, d)}
    c = ckpt.hf_config
    d_r, d_c, v = cfg.rope_dims, k - cfg.rope_dims, int(c["v_head_dim"])
    cq, ckv = cfg.q_latent_dim, cfg.kv_latent_dim
    perm = _interleaved_to_half(d_r) if _interleaved(ckpt) else np.arange(d_r)
    p = {}
    if cq:
        p["w_dq"] = read("q_a_proj.weight", (cq, d)).T
        norm_q = read("q_a_layernorm.weight", (cq,))
        w_up = norm_q[:, None] * read("q_b_proj.weight", (h * k, cq)).T    # fold the norm weight
        w_up = w_up.reshape(cq, h, k)
    else:
        w_up = read("q_proj.weight", (h * k, d)).T.reshape(d, h, k)
    kv_a = read("kv_a_proj_with_mqa.weight", (ckv + d_r, d)).T
    p["w_dkv"] = kv_a[:, :ckv]
    norm_kv = read("kv_a_layernorm.weight", (ckv,))
    kv_b = (norm_kv[:, None] * read("kv_b_proj.weight", (h * (d_c + v), ckv)).T).reshape(ckv, h, d_c + v)
    if d_r:
        p["w_qr"] = w_up[..., d_c:][..., perm]
        p["w_kr"] = kv_a[:, ckv:][:, perm]
    if d_c:
        p["w_uq"] = w_up[..., :d_c]
        p["w_uk"] = kv_b[..., :d_c]
    p["w_uv"] = np.pad(kv_b[..., d_c:], ((0, 0), (0, 0), (0, k - v)))
    w_o = read("o_proj.weight", (d, h * v)).T.reshape(h, v, d)
    p["w_o"] = np.pad(w_o, ((0, 0), (0, k - v), (0, 0)))
    return p


def iter_layers(ckpt: HFCheckpoint) -> Iterator[dict[str, np.ndarray]]:
    """Each layer's attention params in turn; the previous layer's are dropped by the caller."""
    for layer in range(ckpt.cfg.num_layers):
        yield layer_params(ckpt, layer)


# Export -----------------------------------------------------------------------------------------

def hf_config_of(cfg: ModelConfig) -> dict:
    """The config.json of this project's model in the Hugging Face layout of its kind."""
    common = {"hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float32", "attention_bias": False}
    if cfg.kind in ("mha", "gqa"):
        out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
               "num_key_value_heads": cfg.num_heads if cfg.kind == "mha" else cfg.num_kv_heads,
               "head_dim": cfg.d_head}
        if cfg.rope_dims != cfg.d_head:
            out["partial_rotary_factor"] = cfg.rope_dims / cfg.d_head
        return out
    if cfg.kind == "mla_decoupled":
        return {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], **common,
                "num_key_value_heads": cfg.num_heads, "q_lora_rank": cfg.q_latent_dim or None,
                "kv_lora_rank": cfg.kv_latent_dim, "qk_nope_head_dim": cfg.d_head - cfg.rope_dims,
                "qk_rope_head_dim": cfg.rope_dims, "v_head_dim": cfg.d_head,
                "n_routed_experts": None, "first_k_dense_replace": cfg.num_layers,
                "rope_interleave": True}
    raise CheckpointError(f"kind {cfg.kind!r} has no Hugging Face layout; exportable kinds: "
                          "mha, gqa (LLaMA), mla_decoupled (DeepSeek-V2)")


def _attention_tensors(cfg: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    """One layer's attention params -> HF tensors (names relative to self_attn.)."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_head
    t = lambda w_2d: np.ascontiguousarray(np.asarray(w_2d, np.float32).T)
    o = np.ascontiguousarray(np.asarray(p["w_o"], np.float32).reshape(-1, d).T)
    if cfg.kind in ("mha", "gqa"):
        flat = lambda w: np.ascontiguousarray(np.asarray(w, np.float32).reshape(d, -1).T)
        return {"q_proj.weight": flat(p["w_q"]), "k_proj.weight": flat(p["w_k"]),
                "v_proj.weight": flat(p["w_v"]), "o_proj.weight": o}
    d_r, d_c = cfg.rope_dims, k - cfg.rope_dims
    back = np.argsort(_interleaved_to_half(d_r))          # rotate-half -> interleaved order
    q_in = p["w_uq"].shape[0] if d_c else p["w_qr"].shape[0]
    ckv = cfg.kv_latent_dim
    q_parts = ([np.asarray(p["w_uq"])] if d_c else []) + ([np.asarray(p["w_qr"])[..., back]] if d_r else [])
    w_up = np.concatenate(q_parts, axis=-1).reshape(q_in, h * k)
    kv_a = np.concatenate([np.asarray(p["w_dkv"])] + ([np.asarray(p["w_kr"])[:, back]] if d_r else []), axis=1)
    kv_b = np.concatenate(([np.asarray(p["w_uk"])] if d_c else []) + [np.asarray(p["w_uv"])], axis=-1)
    out = {"kv_a_proj_with_mqa.weight": t(kv_a), "kv_a_layernorm.weight": np.ones(ckv, np.float32),
           "kv_b_proj.weight": t(kv_b.reshape(ckv, -1)), "o_proj.weight": o}
    if cfg.q_latent_dim:
        out.update({"q_a_proj.weight": t(np.asarray(p["w_dq"])), "q_b_proj.weight": t(w_up),
                    "q_a_layernorm.weight": np.ones(cfg.q_latent_dim, np.float32)})
    else:
        out["q_proj.weight"] = t(w_up)
    return out


def export(params, cfg: ModelConfig, directory) -> pathlib.Path:
    """Writes the model's params (unboxed, layers stacked) as config.json, one safetensors
    shard per layer plus one for the embeddings and head, and model.safetensors.index.json."""
    hf_config = hf_config_of(cfg)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = params["layers"]
    shards = cfg.num_layers + 1
    name_of = lambda i: f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    weight_map = {}

    def write(i, tensors):
        save_file({n: np.ascontiguousarray(np.asarray(x, np.float32)) for n, x in tensors.items()},
                  str(directory / name_of(i)), metadata={"format": "pt"})
        weight_map.update({n: name_of(i) for n in tensors})

    for layer in range(cfg.num_layers):
        pick = lambda tree: {n: np.asarray(x[layer]) for n, x in tree.items()}
        stem = f"model.layers.{layer}."
        gate_up = np.asarray(layers["mlp"]["w_gate_up"][layer])
        tensors = {stem + "self_attn." + n: x
                   for n, x in _attention_tensors(cfg, pick(layers["attention"])).items()}
        tensors.update({stem + "input_layernorm.weight": layers["attention_norm"]["scale"][layer],
                        stem + "post_attention_layernorm.weight": layers["mlp_norm"]["scale"][layer],
                        stem + "mlp.gate_proj.weight": gate_up[:, 0, :].T,
                        stem + "mlp.up_proj.weight": gate_up[:, 1, :].T,
                        stem + "mlp.down_proj.weight": np.asarray(layers["mlp"]["w_down"][layer]).T})
        write(layer, tensors)
    write(cfg.num_layers, {"model.embed_tokens.weight": params["embed"],
                           "model.norm.weight": params["final_norm"]["scale"],
                           "lm_head.weight": np.asarray(params["lm_head"]).T})
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=1))
    return directory


def diagnostics_config(matrices: str = "", null: str = "product") -> ml_collections.ConfigDict:
    """A config.diagnostics with the given matrices and null law (for checkpoints without a run)."""
    c = presets.base_config().diagnostics
    c.matrices, c.null = matrices, null
    return c
