"""Hugging Face-layout checkpoints: the mapped maps give the layout's logits, both analysis
paths give the same numbers, bad checkpoints are named, memory is one layer's."""
import json
import pathlib
import subprocess
import sys
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO
from mla_rmt import analyze, attention, checkpoint, config_check, hf_checkpoint, presets, rope, sharding
from mla_rmt.step import make_trainer
from mla_rmt import trial as trial_module
from mla_rmt.model import Transformer

THETA = 50.0   # small, so that a dozen positions turn the rotary pairs far


# Checkpoints written with numpy + safetensors --------------------------------------------------

def _save(directory: pathlib.Path, config: dict, tensors: dict, shards: int):
    """config.json and the tensors, in one model.safetensors or in `shards` files with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, str(directory / file))
        weight_map.update({names[j]: file for j in part})
    (directory / hf_checkpoint.INDEX).write_text(json.dumps({"weight_map": weight_map}))


def write_llama(directory, rng, *, layers=2, d=32, h=4, g=2, hd=8, partial=None, bias=False,
                shards=1, dtype=np.float32, model_type="llama"):
    config = {"model_type": model_type, "hidden_size": d, "num_attention_heads": h,
              "num_key_value_heads": g, "head_dim": hd, "num_hidden_layers": layers,
              "intermediate_size": 3 * d, "vocab_size": 50, "rope_theta": THETA, "rms_norm_eps": 1e-6}
    if partial is not None:
        config["partial_rotary_factor"] = partial
    tensors = {}
    for i in range(layers):
        s = f"model.layers.{i}."
        tensors[s + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(d)
        for name, rows in (("q", h * hd), ("k", g * hd), ("v", g * hd)):
            tensors[s + f"self_attn.{name}_proj.weight"] = rng.standard_normal((rows, d)) / np.sqrt(d)
            if bias:
                tensors[s + f"self_attn.{name}_proj.bias"] = rng.standard_normal(rows)
        tensors[s + "self_attn.o_proj.weight"] = rng.standard_normal((d, h * hd)) / np.sqrt(h * hd)
        tensors[s + "post_attention_layernorm.weight"] = np.ones(d)     # read by no map
    _save(pathlib.Path(directory), config, {n: x.astype(dtype) for n, x in tensors.items()}, shards)
    return config, tensors


def write_deepseek(directory, rng, *, layers=2, d=48, h=4, q_lora=24, kv_lora=16, nope=8,
                   rope_dims=4, v=6, shards=1, model_type="deepseek_v2"):
    config = {"model_type": model_type, "hidden_size": d, "num_attention_heads": h,
              "num_key_value_heads": h, "num_hidden_layers": layers, "q_lora_rank": q_lora,
              "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope_dims,
              "v_head_dim": v, "intermediate_size": 2 * d, "vocab_size": 50,
              "rope_theta": THETA, "rms_norm_eps": 1e-6}
    k = nope + rope_dims
    tensors = {}
    for i in range(layers):
        s = f"model.layers.{i}.self_attn."
        if q_lora:
            tensors[s + "q_a_proj.weight"] = rng.standard_normal((q_lora, d)) / np.sqrt(d)
            tensors[s + "q_a_layernorm.weight"] = 1 + 0.3 * rng.standard_normal(q_lora)
            tensors[s + "q_b_proj.weight"] = rng.standard_normal((h * k, q_lora)) / np.sqrt(q_lora)
        else:
            tensors[s + "q_proj.weight"] = rng.standard_normal((h * k, d)) / np.sqrt(d)
        tensors[s + "kv_a_proj_with_mqa.weight"] = rng.standard_normal((kv_lora + rope_dims, d)) / np.sqrt(d)
        tensors[s + "kv_a_layernorm.weight"] = 1 + 0.3 * rng.standard_normal(kv_lora)
        tensors[s + "kv_b_proj.weight"] = rng.standard_normal((h * (nope + v), kv_lora)) / np.sqrt(kv_lora)
        tensors[s + "o_proj.weight"] = rng.standard_normal((d, h * v)) / np.sqrt(h * v)
    _save(pathlib.Path(directory), config, {n: x.astype(np.float32) for n, x in tensors.items()}, shards)
    return config, {n: x.astype(np.float32).astype(np.float64) for n, x in tensors.items()}


# Float64 reference forwards of the two layouts, as their model code computes them --------------

def _rotate_half_rope(x_TxHxK, pos_T, r):
    """LLaMA/HF: rotate pairs (i, i + r/2) of the first r dims; the rest pass through."""
    inv = 1.0 / THETA ** (np.arange(0, r, 2) / r)
    ang = np.concatenate([pos_T[:, None] * inv] * 2, axis=-1)[:, None, :]
    x_rot, x_pass = x_TxHxK[..., :r], x_TxHxK[..., r:]
    half = np.concatenate([-x_rot[..., r // 2:], x_rot[..., :r // 2]], axis=-1)
    return np.concatenate([x_rot * np.cos(ang) + half * np.sin(ang), x_pass], axis=-1)


def _interleaved_rope(x_TxHxR, pos_T):
    """DeepSeek: pairs (2i, 2i+1) as one complex number turned by pos * theta^(-2i/r)."""
    r = x_TxHxR.shape[-1]
    z = x_TxHxR[..., 0::2] + 1j * x_TxHxR[..., 1::2]
    z = z * np.exp(1j * pos_T[:, None, None] / THETA ** (np.arange(0, r, 2) / r))
    return np.stack([z.real, z.imag], axis=-1).reshape(x_TxHxR.shape)


def llama_reference(config, tensors, layer, x_TxD, pos_T, with_bias=True):
    """(logits [H, T, T] before the mask, attention output [T, D]) of one HF LLaMA layer."""
    h, g, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    r = int(hd * config.get("partial_rotary_factor", 1.0))
    s = f"model.layers.{layer}.self_attn."
    proj = lambda n, heads: (x_TxD @ tensors[s + f"{n}_proj.weight"].T
                             + (tensors.get(s + f"{n}_proj.bias", 0.0) if with_bias else 0.0)
                             ).reshape(len(x_TxD), heads, hd)
    q = _rotate_half_rope(proj("q", h), pos_T, r)
    k = np.repeat(_rotate_half_rope(proj("k", g), pos_T, r), h // g, axis=1)
    v = np.repeat(proj("v", g), h // g, axis=1)
    logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(hd)
    probs = _causal_softmax(logits)
    out = np.einsum("hts,shk->thk", probs, v).reshape(len(x_TxD), h * hd) @ tensors[s + "o_proj.weight"].T
    return logits, out


def _rms(c, eps=1e-6):
    return 1.0 / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + eps)


def deepseek_reference(config, tensors, layer, x_TxD, pos_T):
    """(logits [H, T, T], output [T, D], 1/rms of c_Q [T], 1/rms of c_KV [T]) of one MLA layer."""
    h, nope, r, v = (config[n] for n in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    ckv, t = config["kv_lora_rank"], len(x_TxD)
    s = f"model.layers.{layer}.self_attn."
    if config["q_lora_rank"]:
        c_q = x_TxD @ tensors[s + "q_a_proj.weight"].T
        r_q = _rms(c_q)
        q = (c_q * r_q * tensors[s + "q_a_layernorm.weight"]) @ tensors[s + "q_b_proj.weight"].T
    else:
        r_q = np.ones((t, 1))
        q = x_TxD @ tensors[s + "q_proj.weight"].T
    q = q.reshape(t, h, nope + r)
    kv_a = x_TxD @ tensors[s + "kv_a_proj_with_mqa.weight"].T
    c_kv, k_pe = kv_a[:, :ckv], kv_a[:, ckv:]
    r_kv = _rms(c_kv)
    kv = ((c_kv * r_kv * tensors[s + "kv_a_layernorm.weight"]) @ tensors[s + "kv_b_proj.weight"].T).reshape(t, h, nope + v)
    q_pe = _interleaved_rope(q[..., nope:], pos_T)
    k_pe = _interleaved_rope(k_pe[:, None, :], pos_T)
    logits = (np.einsum("thk,shk->hts", q[..., :nope], kv[..., :nope])
              + np.einsum("thk,sk->hts", q_pe, k_pe[:, 0])) / np.sqrt(nope + r)
    out = np.einsum("hts,shk->thk", _causal_softmax(logits), kv[..., nope:]).reshape(t, h * v)
    return logits, out @ tensors[s + "o_proj.weight"].T, r_q[:, 0], r_kv[:, 0]


def _causal_softmax(logits_HxTxT):
    t = logits_HxTxT.shape[-1]
    z = np.where(np.tril(np.ones((t, t), bool)), logits_HxTxT, -np.inf)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# This project's side -----------------------------------------------------------------------------

def mapped_logits(cfg, params, x_TxD, pos_T):
    """Logits from the kind's effective maps and this project's rotary: (rotary part [H, T, T],
    unrotated part [H, T, T]) before the 1/sqrt(d_head) scale."""
    wq, wk = attention.get(cfg.kind).qk_maps(cfg, params)
    x = jnp.asarray(x_TxD, jnp.float32)[None]
    pos = jnp.asarray(pos_T)[None]
    q = rope.rotate(jnp.einsum("btd,dhk->bthk", x, wq), pos, cfg.rope_dims, cfg.rope_theta)[0]
    k = rope.rotate(jnp.einsum("btd,dhk->bthk", x, wk), pos, cfg.rope_dims, cfg.rope_theta)[0]
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    r = cfg.rope_dims
    return (np.einsum("thk,shk->hts", q[..., :r], k[..., :r]),
            np.einsum("thk,shk->hts", q[..., r:], k[..., r:]))


def module_forward(cfg, params, x_TxD, pos_T):
    """(post-softmax probs [H, T, T], output [T, D]) of the kind's own Flax module."""
    module = attention.get(cfg.kind)(cfg)
    out, state = module.apply({"params": params}, jnp.asarray(x_TxD, jnp.float32)[None],
                              jnp.asarray(pos_T)[None], capture=True, mutable=["intermediates"])
    return np.asarray(state["intermediates"]["probs_BxHxTxT"][0][0]), np.asarray(out[0])


def _close(a, b, rtol=2e-5):
    np.testing.assert_allclose(a, b, atol=rtol * np.abs(b).max(), rtol=0)


# The maps reproduce the logits -----------------------------------------------------------------

@pytest.mark.parametrize("h,g,partial,bias,shards", [(4, 4, None, False, 1), (4, 2, None, False, 3),
                                                     (4, 1, 0.5, True, 2), (6, 3, 0.25, False, 1)])
def test_llama_maps_reproduce_the_reference_logits(tmp_path, h, g, partial, bias, shards):
    rng = np.random.default_rng(h * 10 + g)
    config, tensors = write_llama(tmp_path, rng, h=h, g=g, d=8 * h, partial=partial, bias=bias, shards=shards)
    ckpt = hf_checkpoint.open_checkpoint(tmp_path)
    assert ckpt.cfg.kind == ("mha" if g == h else "gqa") and ckpt.cfg.num_kv_heads == g
    assert ckpt.cfg.rope_dims == int(8 * (partial or 1.0))
    x, pos = rng.standard_normal((7, 8 * h)), np.array([0, 1, 2, 5, 9, 13, 20])
    for layer in range(2):
        params = hf_checkpoint.layer_params(ckpt, layer)
        # Biases add terms linear in x; the bilinear form is the bias-free layer's.
        ref_logits, ref_out = llama_reference(config, tensors, layer, x, pos, with_bias=False)
        rot, plain = mapped_logits(ckpt.cfg, params, x, pos)
        _close((rot + plain) / np.sqrt(8), ref_logits)
        probs, out = module_forward(ckpt.cfg, params, x, pos)
        _close(probs, _causal_softmax(ref_logits))
        _close(out, ref_out)
    if bias:
        assert ckpt.source()["ignored"] == [f"model.layers.0.self_attn.{n}_proj.bias" for n in "kqv"]


@pytest.mark.parametrize("q_lora,nope,rope_dims,v", [(24, 8, 4, 6), (0, 8, 4, 12), (24, 0, 6, 6),
                                                     (0, 10, 0, 4)])
def test_deepseek_maps_reproduce_the_reference_logits(tmp_path, q_lora, nope, rope_dims, v):
    rng = np.random.default_rng(q_lora + nope + rope_dims)
    config, tensors = write_deepseek(tmp_path, rng, q_lora=q_lora, nope=nope, rope_dims=rope_dims, v=v,
                                     shards=2)
    ckpt = hf_checkpoint.open_checkpoint(tmp_path)
    cfg = ckpt.cfg
    assert (cfg.kind, cfg.d_head, cfg.rope_dims, cfg.q_latent_dim) == ("mla_decoupled", nope + rope_dims,
                                                                      rope_dims, q_lora)
    x, pos = rng.standard_normal((6, 48)), np.array([0, 2, 3, 7, 11, 19])
    for layer in range(2):
        params = hf_checkpoint.layer_params(ckpt, layer)
        ref_logits, _, r_q, r_kv = deepseek_reference(config, tensors, layer, x, pos)
        rot, content = mapped_logits(cfg, params, x, pos)
        # The latent norms' per-token 1/rms factors, written out: a whole query, a key's content.
        mapped = r_q[None, :, None] * (content * r_kv[None, None, :] + rot) / np.sqrt(nope + rope_dims)
        _close(mapped, ref_logits)
    if q_lora == 0:
        # Tokens scaled to unit latent RMS: the kind's own module is then the layer itself.
        c_kv = x @ tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][:16].T
        x_unit = x * np.sqrt((1 - 1e-6) / np.mean(c_kv * c_kv, axis=-1, keepdims=True))
        ref_logits, ref_out, _, r_kv = deepseek_reference(config, tensors, 0, x_unit, pos)
        np.testing.assert_allclose(r_kv, 1.0, rtol=1e-9)
        probs, out = module_forward(cfg, hf_checkpoint.layer_params(ckpt, 0), x_unit, pos)
        _close(probs, _causal_softmax(ref_logits))
        _close(out, ref_out)


def test_rope_interleave_false_keeps_the_order(tmp_path):
    rng = np.random.default_rng(3)
    config, _ = write_deepseek(tmp_path / "a", rng, shards=1)
    config["rope_interleave"] = False
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    interleaved = dict(config, rope_interleave=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(interleaved))
    (tmp_path / "b" / "model.safetensors").symlink_to(tmp_path / "a" / "model.safetensors")
    plain = hf_checkpoint.layer_params(hf_checkpoint.open_checkpoint(tmp_path / "a"), 0)
    turned = hf_checkpoint.layer_params(hf_checkpoint.open_checkpoint(tmp_path / "b"), 0)
    np.testing.assert_array_equal(turned["w_kr"], plain["w_kr"][:, [0, 2, 1, 3]])
    np.testing.assert_array_equal(turned["w_qr"], plain["w_qr"][..., [0, 2, 1, 3]])


def test_bfloat16_and_fp8_block_scaled_weights_are_read(tmp_path):
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(5)
    config, tensors = write_llama(tmp_path / "bf16", rng, dtype=ml_dtypes.bfloat16)
    params = hf_checkpoint.layer_params(hf_checkpoint.open_checkpoint(tmp_path / "bf16"), 1)
    want = tensors["model.layers.1.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params["w_q"], want.T.reshape(32, 4, 8))
    # DeepSeek-V3's fp8: the weight times its inverse scale, block by block (blocks of 16 here).
    config, tensors = write_deepseek(tmp_path / "fp8", rng, model_type="deepseek_v3")
    name = "model.layers.0.self_attn.kv_b_proj.weight"                     # [4 * 14, 16]
    scale = rng.uniform(0.5, 2.0, (4, 1)).astype(np.float32)
    q8 = (tensors[name] / np.repeat(scale, 16, axis=0)[:56]).astype(ml_dtypes.float8_e4m3fn)
    all_tensors = {n: x.astype(np.float32) for n, x in tensors.items()}
    all_tensors[name], all_tensors[name + "_scale_inv"] = q8, scale
    config["quantization_config"] = {"weight_block_size": [16, 16]}
    _save(tmp_path / "fp8", config, all_tensors, 1)
    ckpt = hf_checkpoint.open_checkpoint(tmp_path / "fp8")
    kv_b = hf_checkpoint.read_tensor(ckpt, name, (56, 16))
    np.testing.assert_array_equal(kv_b, q8.astype(np.float32) * np.repeat(scale, 16, axis=0)[:56])
    np.testing.assert_allclose(kv_b, tensors[name], rtol=0.07, atol=0.02)


# Both paths give the same numbers ----------------------------------------------------------------

def _trial(workdir: pathlib.Path, **attention_fields):
    """A trial directory as mla_rmt.main leaves it: config.json and an orbax checkpoint of
    params with planted low-rank structure (so the metrics are far from their init values)."""
    config = presets.base_config()
    config.model.update(num_layers=3, d_model=64, num_heads=4, d_head=16, mlp_dim=96, vocab_size=64)
    config.model.attention.update(attention_fields)
    config.data.seq_len = 16
    cfg = config_check.validate(config)
    trainer = make_trainer(config, cfg, sharding.make_mesh(config.mesh))
    state = trainer.init_state(jax.random.key(7))
    rng = np.random.default_rng(11)

    def plant(w):
        w = np.asarray(w)
        if w.ndim < 3:
            return w
        u = rng.standard_normal(w.shape[:2])[:, :, None]                 # one spike per layer
        v = rng.standard_normal((w.shape[0], 1, int(np.prod(w.shape[2:]))))
        spike = (u * v / np.sqrt(w.shape[1])).reshape(w.shape)
        return (w + spike).astype(w.dtype)

    params = jax.tree.map(plant, state.params)
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=2, async_save=False)
    ckpt.save(3, state, force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    return config, cfg, params


# mla_decoupled: the two branches (analytic null laws) and the whole heads (null laws sampled
# from the kind's init, through both paths from the same draws).
@pytest.mark.parametrize("fields,matrices", [
    (dict(kind="gqa", num_kv_heads=2, rope_fraction=0.5), "qk_gram,qk_circuit"),
    (dict(kind="mla_decoupled", rope_fraction=0.25, q_latent_dim=32, kv_latent_dim=24),
     "qk_gram_content,qk_gram_rope,qk_circuit,qk_circuit_sum")], ids=["gqa", "mla_decoupled"])
def test_trained_model_gives_the_same_numbers_through_both_paths(tmp_path, fields, matrices):
    workdir = tmp_path / "trial"
    workdir.mkdir()
    _, cfg, params = _trial(workdir, **fields)
    exported = tmp_path / "hf"
    cli = fields["kind"] == "gqa"      # the command lines once; in process otherwise (faster)
    if cli:
        proc = subprocess.run([sys.executable, "-m", "mla_rmt.export_hf", f"--workdir={workdir}",
                               f"--output={exported}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        hf_checkpoint.export(trial_module.restore(str(workdir))[2], cfg, exported)
    ckpt = hf_checkpoint.open_checkpoint(exported)
    assert len(list(exported.glob("*.safetensors"))) == cfg.num_layers + 1
    for layer in range(cfg.num_layers):      # the exported weights read back bit for bit
        back = hf_checkpoint.layer_params(ckpt, layer)
        assert set(back) == set(params["layers"]["attention"])
        for name, w in back.items():
            np.testing.assert_array_equal(w, params["layers"]["attention"][name][layer], err_msg=name)

    trial = analyze.analyze(str(workdir), matrices=matrices)
    output = tmp_path / "out" / "spectra.json"
    first, last = matrices.split(",")[0], matrices.split(",")[-1]
    if cli:
        proc = subprocess.run([sys.executable, "-m", "mla_rmt.analyze", f"--hf={exported}",
                               f"--output={output}", f"--matrices={matrices}"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "alpha" in proc.stdout and last in proc.stdout
        hf = json.loads(output.read_text())
    else:
        hf, spectra, specs, ckpt = analyze.analyze_hf(str(exported), matrices)
        analyze.write_run(output.parent, hf, spectra, specs, ckpt.hf_config)
    assert hf["source"]["kind"] == cfg.kind and trial["step"] == 3
    assert set(hf["scalars"]) == set(trial["scalars"]) and len(hf["scalars"]) >= 100
    # Bit-identical weights; what differs is fp32 rounding, layers vmapped vs one at a time.
    for tag, value in trial["scalars"].items():
        np.testing.assert_allclose(hf["scalars"][tag], value, rtol=1e-3, atol=1e-6, err_msg=tag)
    for name, fits in trial["tail_fit"].items():
        assert hf["tail_fit"][name]["status"] == fits["status"]
        np.testing.assert_allclose(np.asarray(hf["tail_fit"][name]["alpha"], float),
                                   np.asarray(fits["alpha"], float), rtol=1e-3, err_msg=name)
    assert any(s == "ok" for s in np.ravel(hf["tail_fit"][first]["status"]))

    # The TensorBoard run: the training tags, the histograms and the ESD figures.
    from conftest import read_scalars  # pylint: disable=import-outside-toplevel
    logged = read_scalars(output.parent)
    for tag, value in hf["scalars"].items():
        assert logged[tag] == {0: pytest.approx(value, rel=1e-6, abs=1e-6)}, tag
    assert any(t.startswith(f"tail_fit/{first}/alpha/layer_") for t in logged)
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    events = next(output.parent.glob("events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert f"spectral/{last}/eigenvalues/layer_02" in acc.Tags()["histograms"]
    assert f"spectral/{last}/esd/layer_02" in acc.Tags()["images"]
    assert (output.parent / "esd" / f"{first}_layer_00.png").stat().st_size > 1000


def test_exported_llama_is_the_same_model(tmp_path):
    """The exported files, run by a float64 reference LLaMA forward, give this project's logits."""
    config = presets.base_config()
    config.model.update(num_layers=2, d_model=32, num_heads=4, d_head=8, mlp_dim=48, vocab_size=40,
                        dtype="float32")
    config.model.attention.update(kind="gqa", num_kv_heads=2, rope_fraction=0.5)
    config.model.rope_theta = THETA
    cfg = config_check.validate(config)
    model = Transformer(cfg)
    tokens = np.array([[3, 17, 5, 0, 39, 22, 8, 8, 1]])
    params = model.init(jax.random.key(1), tokens)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda w: np.asarray(w) + 0.05 * rng.standard_normal(w.shape).astype(np.float32),
                          nn.meta.unbox(params))
    ours = np.asarray(model.apply({"params": params}, tokens)[0], np.float64)
    hf_checkpoint.export(params, cfg, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["partial_rotary_factor"] == 0.5
    t = {}
    for file in tmp_path.glob("*.safetensors"):
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        t.update({n: x.astype(np.float64) for n, x in load_file(str(file)).items()})
    norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w
    x = t["model.embed_tokens.weight"][tokens[0]]
    pos = np.arange(len(tokens[0]))
    for layer in range(2):
        s = f"model.layers.{layer}."
        _, attn = llama_reference(hf_config, t, layer, norm(x, t[s + "input_layernorm.weight"]), pos)
        x = x + attn
        y = norm(x, t[s + "post_attention_layernorm.weight"])
        gate, up = y @ t[s + "mlp.gate_proj.weight"].T, y @ t[s + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[s + "mlp.down_proj.weight"].T
    reference = norm(x, t["model.norm.weight"]) @ t["lm_head.weight"].T
    _close(ours, reference, rtol=1e-4)


def test_mla_prerope_has_no_hf_layout():
    config = presets.base_config()
    config.model.attention.kind = "mla_prerope"
    with pytest.raises(hf_checkpoint.CheckpointError, match="mla_prerope"):
        hf_checkpoint.hf_config_of(config_check.validate(config))


# Bad checkpoints fail with the file and the field -----------------------------------------------

def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change,pattern", [
    (dict(model_type="gpt2"), r"config\.json: field 'model_type' = 'gpt2' is not supported"),
    (dict(num_attention_heads=None), r"config\.json: field 'num_attention_heads' is missing"),
    (dict(num_key_value_heads=3), r"config\.json: field 'num_key_value_heads' = 3 must divide"),
    (dict(partial_rotary_factor=0.2), r"config\.json: field 'partial_rotary_factor' = 0\.2 gives 1 rotary dims"),
    (dict(hidden_size="wide"), r"config\.json: field 'hidden_size' = 'wide' must be an integer"),
    (dict(num_hidden_layers=3), r"model\.safetensors: tensor 'model\.layers\.2\.self_attn\.q_proj\.weight' is missing"),
    (dict(head_dim=4), r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(32, 32\), but .*config\.json implies \(16, 32\)"),
])
def test_malformed_llama_names_file_and_field(tmp_path, change, pattern):
    write_llama(tmp_path, np.random.default_rng(0))
    _edit_config(tmp_path, **change)
    with pytest.raises(hf_checkpoint.CheckpointError, match=pattern):
        ckpt = hf_checkpoint.open_checkpoint(tmp_path)
        for _ in hf_checkpoint.iter_layers(ckpt):
            pass


@pytest.mark.parametrize("change,pattern", [
    (dict(v_head_dim=20), r"config\.json: field 'v_head_dim' = 20 is wider than the query/key head \(12\)"),
    (dict(qk_rope_head_dim=3), r"config\.json: fields 'qk_nope_head_dim' = 8, 'qk_rope_head_dim' = 3"),
    (dict(kv_lora_rank=None), r"config\.json: field 'kv_lora_rank' is missing"),
    (dict(kv_lora_rank=64), r"config\.json: these fields give a model .*kv_latent_dim: 64"),
])
def test_malformed_deepseek_names_file_and_field(tmp_path, change, pattern):
    write_deepseek(tmp_path, np.random.default_rng(0))
    _edit_config(tmp_path, **change)
    with pytest.raises(hf_checkpoint.CheckpointError, match=pattern):
        hf_checkpoint.open_checkpoint(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"config\.json: no config\.json"):
        hf_checkpoint.open_checkpoint(tmp_path)
    write_llama(tmp_path / "sharded", np.random.default_rng(0), shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(hf_checkpoint.CheckpointError,
                       match=r"model\.safetensors\.index\.json: 'weight_map' names model-00002-of-00002\.safetensors"):
        hf_checkpoint.open_checkpoint(tmp_path / "sharded")
    write_llama(tmp_path / "empty", np.random.default_rng(0))
    (tmp_path / "empty" / "model.safetensors").unlink()
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"empty: no model\.safetensors\.index\.json and no \*\.safetensors"):
        hf_checkpoint.open_checkpoint(tmp_path / "empty")
    write_deepseek(tmp_path / "layout", np.random.default_rng(0))
    _edit_config(tmp_path / "layout", model_type="llama", num_key_value_heads=4)
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"no tensor '\*layers\.0\.self_attn\.q_proj\.weight'"):
        hf_checkpoint.open_checkpoint(tmp_path / "layout")


def test_cli_names_the_bad_field_and_writes_nothing(tmp_path):
    write_llama(tmp_path / "m", np.random.default_rng(0))
    _edit_config(tmp_path / "m", num_key_value_heads=3)
    output = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "mla_rmt.analyze", f"--hf={tmp_path / 'm'}",
                           f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{tmp_path / 'm' / 'config.json'}: field 'num_key_value_heads' = 3" in proc.stderr
    assert not output.exists() and not (tmp_path / "m" / "analysis").exists()


# Memory: one layer at a time ----------------------------------------------------------------------

def test_host_memory_is_one_layer_not_the_model(tmp_path):
    """tracemalloc peak of the whole analysis: 2 layers vs 8 layers of 2 MiB of attention each."""
    layer_bytes = 4 * 256 * 512 * 4          # q, k, v, o: 4 x [256, 512] fp32
    peaks = {}
    for layers in (2, 8):
        write_llama(tmp_path / str(layers), np.random.default_rng(layers), layers=layers, d=512,
                    h=4, g=4, hd=64)
        run = lambda: analyze.analyze_hf(str(tmp_path / str(layers)), "qk_circuit", fit_tails=False)
        run()                                 # null laws and caches warm
        tracemalloc.start()
        run()
        peaks[layers] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[8] < peaks[2] + 0.5 * layer_bytes, peaks
    assert peaks[8] < 3 * layer_bytes, peaks
