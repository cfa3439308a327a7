"""Train-step throughput of every attention kind x diagnostics mode, and a PyTorch baseline.

    python bench/throughput.py                       # LLaMA-130M, seq 256, global batch 512 (GPU)
    python bench/throughput.py --tiny                # tiny preset, a few steps (CPU check)
    python bench/throughput.py --kinds=mha,gqa --modes=off,every250 --no_torch

Synthetic tokens (the model's speed, not the input pipeline's), bf16 compute / fp32 params, the
real train steps (`mla_rmt.step.make_trainer`: chunked loss, gradient accumulation over
--microbatch rows, donated state). For each kind x mode: --warmup steps, then --steps timed with
one block_until_ready at each end of the window. Modes:

  off                 diagnostics off: the trainer's plain step (Trainer.train_step)
  every250            weight spectra of the default matrices every 250 steps (configs/rope_budget_sweep.py),
                      timed as the trainer runs it (Trainer.step_for): a window of 250 steps, one
                      spectra step (Trainer.spectra_step) and 249 plain steps (the executable of "off")
  all_every1          spectra of the default matrices every step
  qk_circuit_every1   spectra of the per-head qk_circuit only, every step

every250 and all_every1 share one executable (the spectra step), so each kind compiles up to
3 steps; all compile up front on a thread pool (--compile_workers), then run one at a
time, so compilation never overlaps a timed window.

The JAX part and the PyTorch part (transformers' LlamaForCausalLM of the same sizes,
torch.compile, bf16 autocast, fused AdamW, same batch, microbatches and global-norm clipping)
run in two child processes one after the other, so neither sees the other's GPU memory; this
process only starts them and prints the tables. MFU = tokens/s x FLOPs per token
(mla_rmt.model.flops_per_token: 6 x matmul params incl. the LM head + 12 x layers x seq x
d_model) / (--peak_flops x devices). "mem" is XLA's plan for the compiled step (arguments +
outputs - donated + temporaries); the allocator's peak_bytes_in_use (running max over the
process) is printed as "peak so far".
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

RESULT = "RESULT "
KINDS = {  # name -> config.model.attention overrides
    "mha": {"kind": "mha"},
    "gqa": {"kind": "gqa", "num_kv_heads": 4},
    "mla_prerope": {"kind": "mla_prerope"},
    "mla_decoupled": {"kind": "mla_decoupled"},
    "mha_remove_gap": {"kind": "mha", "remove_gap": True},
}
MODES = {  # name -> (executable, every, matrices)
    "off": ("off", 0, ""),
    "every250": ("all", 250, ""),
    "all_every1": ("all", 1, ""),
    "qk_circuit_every1": ("qk", 1, "qk_circuit"),
}
EXECUTABLES = {"off": (0, ""), "all": (1, ""), "qk": (1, "qk_circuit")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny preset, seq 128, batch 16 in "
                   "microbatches of 8, 3 steps; torch without compile (a CPU check)")
    p.add_argument("--preset", default=None, help="model preset (default llama_130m, tiny with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (256; 128 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="global batch rows per step (512; 16 with --tiny)")
    p.add_argument("--microbatch", type=int, default=None,
                   help="rows per gradient-accumulation microbatch, 0 = off (256; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (20; 3 with --tiny)")
    p.add_argument("--steps_every1", type=int, default=None,
                   help="timed steps of the every-step diagnostics rows, whose cost is large and "
                   "steady (10; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each window (2; 1 with --tiny)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {list(KINDS)}")
    p.add_argument("--modes", default="off,all_every1,qk_circuit_every1",
                   help=f"subset of {list(MODES)} (every250 takes 250 steps a kind: give it its own call)")
    p.add_argument("--rope_fraction", type=float, default=0.5)
    p.add_argument("--kv_latent_dim", type=int, default=0, help="MLA kv latent (0 = d_model / 2)")
    p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--loss_chunk_tokens", type=int, default=None,
                   help="config.train.loss_chunk_tokens (default: the preset default; 0 = plain loss)")
    p.add_argument("--remat", action="store_true", help="config.model.remat")
    p.add_argument("--peak_flops", type=float, default=989e12,
                   help="dense bf16 peak FLOP/s per device for MFU (H100 and H200 SXM: 989e12)")
    p.add_argument("--compile_workers", type=int, default=0,
                   help="threads compiling in parallel (0 = min(8, cores / 2, executables))")
    p.add_argument("--time_budget", type=float, default=500.0,
                   help="seconds for the whole run; JAX rows past (budget - torch_reserve) are "
                   "skipped, the torch part is killed at the budget")
    p.add_argument("--torch_reserve", type=float, default=150.0,
                   help="seconds of the budget kept for the torch part")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--torch_compile", default=None, choices=["full", "regional", "none"],
                   help="torch.compile the whole loss (full), each decoder layer (regional) or "
                   "nothing (default full; none with --tiny)")
    p.add_argument("--torch_python", default=sys.executable, help="interpreter for the torch part")
    p.add_argument("--json_out", default="", help="also write all results to this JSON file")
    p.add_argument("--part", default="", choices=["", "jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(preset="tiny" if tiny else "llama_130m", seq=128 if tiny else 256,
                    batch=16 if tiny else 512, microbatch=8 if tiny else 256,
                    steps=3 if tiny else 20, steps_every1=3 if tiny else 10, warmup=1 if tiny else 2,
                    torch_compile="none" if tiny else "full")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name, known, what in ((args.kinds, KINDS, "--kinds"), (args.modes, MODES, "--modes")):
        unknown = set(name.split(",")) - set(known)
        if unknown:
            p.error(f"{what}: unknown {sorted(unknown)}; known: {list(known)}")
    return args


def sizes(args) -> dict:
    """The model sizes of the preset (shared with the torch part, which has no mla_rmt import)."""
    from mla_rmt import presets  # pylint: disable=import-outside-toplevel
    return dict(presets.MODEL_PRESETS[args.preset])


# ---------------------------------------------------------------------------------------------
# JAX part (child process)


def jax_config(args, kind: str, every: int, matrices: str):
    from mla_rmt import presets  # pylint: disable=import-outside-toplevel
    config = presets.base_config()
    presets.apply_model_preset(config, args.preset)
    a = config.model.attention
    a.rope_fraction = args.rope_fraction
    a.kv_latent_dim = args.kv_latent_dim or config.model.d_model // 2
    for key, value in KINDS[kind].items():
        a[key] = value
    if kind == "gqa" and config.model.num_heads % a.num_kv_heads:
        a.num_kv_heads = 2
    config.model.attention_impl = args.attention_impl
    config.model.remat = args.remat
    config.data.seq_len, config.data.global_batch_size = args.seq, args.batch
    config.train.microbatch_size = args.microbatch
    if args.loss_chunk_tokens is not None:
        config.train.loss_chunk_tokens = args.loss_chunk_tokens
    config.diagnostics.every, config.diagnostics.matrices = every, matrices
    return config


def _versions_jax() -> str:
    import flax  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    out = [f"python {sys.version.split()[0]}", f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}",
           f"flax {flax.__version__}", f"optax {optax.__version__}"]
    try:
        from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
        if cuda_versions is not None:
            out.append(f"cuDNN {cuda_versions.cudnn_get_version()}")
            out.append(f"CUDA runtime {cuda_versions.cuda_runtime_get_version()}")
    except Exception:  # pylint: disable=broad-except
        pass
    return ", ".join(out)


def _memory_plan(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
        return None


def _peak_bytes() -> int | None:
    import jax  # pylint: disable=import-outside-toplevel
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def jax_part(args) -> dict:
    import concurrent.futures  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from mla_rmt import attention, config_check, sharding  # pylint: disable=import-outside-toplevel
    from mla_rmt.step import make_trainer  # pylint: disable=import-outside-toplevel
    from mla_rmt.model import flops_per_token, param_count  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    deadline = args.deadline or (time.time() + args.time_budget)
    result = dict(rows=[])

    def emit():
        print(RESULT + json.dumps(result), flush=True)
    devices = jax.devices()
    print(f"[jax] {_versions_jax()}", flush=True)
    print(f"[jax] devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})", flush=True)
    kinds, modes = args.kinds.split(","), args.modes.split(",")
    needed = [e for e in EXECUTABLES if any(MODES[m][0] == e for m in modes)
              or (e == "off" and "every250" in modes)]      # its steps between spectra steps
    tokens_per_step = args.batch * args.seq

    # Build every trainer, then lower and compile every step on a thread pool.
    built = {}
    for kind in kinds:
        for exe in needed:
            every, matrices = EXECUTABLES[exe]
            config = jax_config(args, kind, every, matrices)
            cfg = config_check.validate(config)
            mesh = sharding.make_mesh(config.mesh)
            trainer = make_trainer(config, cfg, mesh)
            built[kind, exe] = (config, cfg, mesh, trainer)
    info = {}
    for kind in kinds:
        config, cfg, _, _ = built[kind, needed[0]]
        info[kind] = dict(params=param_count(cfg), flops_per_token=flops_per_token(cfg, args.seq),
                          describe=attention.describe(cfg))
        print(f"[jax] {kind}: {info[kind]['describe']}", flush=True)
    print(f"[jax] batch {args.batch} x seq {args.seq} ({tokens_per_step:,} tokens/step), microbatch "
          f"{args.microbatch or 'off'}, loss chunk {built[kinds[0], needed[0]][0].train.loss_chunk_tokens} "
          f"tokens, attention_impl {args.attention_impl}, remat {args.remat}", flush=True)

    def jitted(kind, exe):
        """The trainer's own jitted step: the plain one for "off", else the spectra step."""
        trainer = built[kind, exe][3]
        return trainer.train_step if exe == "off" else trainer.spectra_step

    def abstract_batch(mesh):
        spec = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32,
                                    sharding=sharding.batch_sharding(mesh))
        return {"inputs": spec, "targets": spec}

    def compile_one(kind, exe, impl_note=""):
        t0 = time.perf_counter()
        _, _, mesh, trainer = built[kind, exe]
        compiled = jitted(kind, exe).lower(trainer.abstract_state, abstract_batch(mesh)).compile()
        return compiled, time.perf_counter() - t0, impl_note

    def compile_with_fallback(kind, exe):
        try:
            return compile_one(kind, exe)
        except Exception as e:  # pylint: disable=broad-except
            if args.attention_impl != "auto" or jax.default_backend() != "gpu":
                raise
            # cuDNN refused at compile time what it accepted while tracing: retry with XLA.
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"[jax] {kind}/{exe}: compile failed with attention_impl=auto ({msg}); "
                  "retrying with xla", flush=True)
            config, cfg, mesh, _ = built[kind, exe]
            config = jax_config(args, kind, *EXECUTABLES[exe])
            config.model.attention_impl = "xla"
            cfg = config_check.validate(config)
            built[kind, exe] = (config, cfg, mesh, make_trainer(config, cfg, mesh))
            return compile_one(kind, exe, impl_note="xla fallback")

    jobs = [(kind, exe) for kind in kinds for exe in needed]
    workers = args.compile_workers or max(1, min(8, (os.cpu_count() or 2) // 2, len(jobs)))
    print(f"[jax] compiling {len(jobs)} train steps on {workers} threads ...", flush=True)
    t0 = time.perf_counter()
    compiled = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(compile_with_fallback, *job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                compiled[job] = future.result()
                print(f"[jax] compiled {job[0]}/{job[1]} in {compiled[job][1]:.1f}s "
                      f"{compiled[job][2]}", flush=True)
            except Exception as e:  # pylint: disable=broad-except
                compiled[job] = None
                print(f"[jax] compile of {job[0]}/{job[1]} FAILED: {type(e).__name__}: "
                      f"{str(e)[:500]}", flush=True)
    compile_seconds = time.perf_counter() - t0
    print(f"[jax] all compiled in {compile_seconds:.1f}s", flush=True)
    rows = []
    result.update(device=f"{len(devices)} x {devices[0].device_kind}", backend=jax.default_backend(),
                  versions=_versions_jax(), rows=rows, info=info, compile_seconds=compile_seconds,
                  n_devices=len(devices))

    rng = np.random.default_rng(0)
    for kind in kinds:
        _, cfg, mesh, trainer = built[kind, needed[0]]
        tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
        batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
        state = None
        for mode in modes:
            exe, every, _ = MODES[mode]
            row = dict(kind=kind, mode=mode, params=info[kind]["params"])
            rows.append(row)
            entry = compiled.get((kind, exe))
            if entry is None:
                row["error"] = "compile failed"
                continue
            if time.time() > deadline - 15:
                row["error"] = "skipped (time budget)"
                print(f"[jax] {kind}/{mode}: skipped (time budget)", flush=True)
                continue
            executable, _, note = entry
            steps = args.steps_every1 if every == 1 else args.steps
            if state is None:
                state = trainer.init_state(jax.random.key(0))
            window = [executable] * steps
            if mode == "every250":
                # What the trainer runs (Trainer.step_for): one spectra step, then every - 1
                # plain steps, the executable of "off".
                steps = every
                window = [executable] + [compiled[kind, "off"][0]] * (every - 1)
            try:
                for exe in dict.fromkeys(window):
                    for _ in range(args.warmup):
                        state, metrics = exe(state, batch)
                jax.block_until_ready((state, metrics))
                t1 = time.perf_counter()
                for exe in window:
                    state, metrics = exe(state, batch)
                jax.block_until_ready((state, metrics))
                seconds = (time.perf_counter() - t1) / steps
            except Exception as e:  # pylint: disable=broad-except
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[jax] {kind}/{mode} FAILED: {row['error']}", flush=True)
                state = None
                continue
            tps = tokens_per_step / seconds
            row.update(step_ms=1e3 * seconds, tokens_per_sec=tps,
                       mfu=tps * info[kind]["flops_per_token"] / (args.peak_flops * len(devices)),
                       mem_plan=_memory_plan(executable), peak_so_far=_peak_bytes(),
                       loss=float(metrics["train/loss"]), note=note)
            print(f"[jax] {kind:15s} {mode:18s} {row['step_ms']:9.1f} ms/step {tps:12,.0f} tok/s "
                  f"MFU {100 * row['mfu']:5.1f}% loss {row['loss']:.3f} {note}", flush=True)
            result.update(seconds=time.perf_counter() - start, peak_bytes=_peak_bytes())
            emit()
        del state
    result.update(seconds=time.perf_counter() - start, peak_bytes=_peak_bytes())
    return result


# ---------------------------------------------------------------------------------------------
# PyTorch part (child process)


def torch_part(args) -> dict:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    s = sizes(args)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"[torch] {versions}, device {name}", flush=True)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                         intermediate_size=s["mlp_dim"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["num_heads"],
                         head_dim=s["d_head"], max_position_embeddings=args.seq, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                         mlp_bias=False, use_cache=False)
    config._attn_implementation = "sdpa"  # pylint: disable=protected-access
    model = LlamaForCausalLM(config).to(dev)      # fp32 parameters
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=cuda)
    vocab = s["vocab_size"]

    def loss_fn(inputs, targets):
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, vocab), targets.reshape(-1))

    if args.torch_compile == "full":
        loss_fn = torch.compile(loss_fn)
    elif args.torch_compile == "regional":
        for layer in model.model.layers:
            layer.compile()

    micro = args.microbatch if 0 < args.microbatch < args.batch else args.batch
    k = args.batch // micro
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(dev)
    chunks = [(tokens[i::k, :-1].contiguous(), tokens[i::k, 1:].contiguous()) for i in range(k)]

    def step():
        total = 0.0
        for inputs, targets in chunks:
            loss = loss_fn(inputs, targets) / k
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    loss = step()                                   # compiles
    sync()
    compile_seconds = time.perf_counter() - t0
    print(f"[torch] first step (compile: {args.torch_compile}) {compile_seconds:.1f}s", flush=True)
    t0 = time.perf_counter()
    for _ in range(max(args.warmup - 1, 1)):
        loss = step()
    sync()
    per_step = (time.perf_counter() - t0) / max(args.warmup - 1, 1)
    steps = args.steps
    if args.deadline:   # fewer timed steps rather than none when the budget runs short
        steps = int(min(steps, max(3, (args.deadline - time.time() - 5) / per_step)))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t1) / steps
    tps = args.batch * args.seq / seconds
    n_matmul = n_params - vocab * s["d_model"] - (2 * s["num_layers"] + 1) * s["d_model"]
    flops_token = 6.0 * n_matmul + 12.0 * s["num_layers"] * args.seq * s["d_model"]
    row = dict(step_ms=1e3 * seconds, tokens_per_sec=tps, mfu=tps * flops_token / args.peak_flops,
               peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
               loss=float(loss), params=n_params, flops_per_token=flops_token, steps=steps)
    print(f"[torch] LlamaForCausalLM {row['step_ms']:9.1f} ms/step {tps:12,.0f} tok/s "
          f"MFU {100 * row['mfu']:5.1f}% loss {row['loss']:.3f} ({steps} timed steps)", flush=True)
    return dict(device=name, versions=versions, compile=args.torch_compile, row=row,
                compile_seconds=compile_seconds, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The parent: runs both parts, prints the tables.


def _run_child(args, part: str, budget: float, python: str, grace: float) -> tuple[dict | None, str]:
    """Runs one part in a child process, echoing its output. The child stops starting rows at
    its deadline (now + budget) and prints its results so far after every row, so a child
    killed `grace` seconds past the deadline still leaves every finished row behind."""
    deadline = time.time() + budget
    argv = [python, os.path.abspath(__file__)] + sys.argv[1:] + [f"--part={part}", f"--deadline={deadline}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state = {"result": None, "tail": []}

    def read():
        for line in proc.stdout:
            if line.startswith(RESULT):
                state["result"] = json.loads(line[len(RESULT):])
                continue
            print(line, end="", flush=True)
            state["tail"] = (state["tail"] + [line])[-20:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, deadline + grace - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
        return state["result"], f"killed {grace:.0f}s past its time budget of {budget:.0f}s"
    reader.join(timeout=5)
    if proc.returncode != 0 or state["result"] is None:
        return state["result"], (f"exit status {proc.returncode}: "
                                 f"{''.join(state['tail'][-5:]).strip()[-600:]}")
    return state["result"], ""


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_tables(args, jax_result, torch_result, torch_error):
    print()
    if jax_result and "device" in jax_result:
        print(f"JAX on {jax_result['device']} ({jax_result['versions']})")
        print(f"LLaMA preset {args.preset}, seq {args.seq}, global batch {args.batch}, microbatch "
              f"{args.microbatch or 'off'}, bf16 compute / fp32 params, rope_fraction "
              f"{args.rope_fraction}, peak {args.peak_flops:.3g} FLOP/s per device, "
              f"{args.steps} timed steps ({args.steps_every1} for every-step diagnostics) after "
              f"{args.warmup} warm-up; compile {jax_result['compile_seconds']:.0f}s "
              f"(parallel), JAX part {jax_result.get('seconds', 0):.0f}s")
        print("| kind | diagnostics | step ms | tokens/s | MFU % | mem GiB (plan) | peak so far GiB "
              "| overhead % vs off |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        by = {(r["kind"], r["mode"]): r for r in jax_result["rows"]}
        for r in jax_result["rows"]:
            if "error" in r:
                print(f"| {r['kind']} | {r['mode']} | {r['error']} | | | | | |")
                continue
            off = by.get((r["kind"], "off"), {})
            over = "-"
            if "step_ms" in off and r["mode"] != "off":
                over = f"{100 * (r['step_ms'] / off['step_ms'] - 1):+.2f}"
            note = f" ({r['note']})" if r.get("note") else ""
            print(f"| {r['kind']}{note} | {r['mode']} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                  f"{100 * r['mfu']:.1f} | {_gib(r['mem_plan'])} | {_gib(r['peak_so_far'])} | {over} |")
    if torch_result:
        t = torch_result["row"]
        print()
        print(f"PyTorch on {torch_result['device']} ({torch_result['versions']}), LlamaForCausalLM "
              f"{t['params']:,} params, torch.compile={torch_result['compile']} "
              f"(first step {torch_result['compile_seconds']:.0f}s), bf16 autocast, "
              f"{'fused ' if t['peak_bytes'] is not None else ''}AdamW, same batch/microbatches")
        print("| framework | step ms | tokens/s | MFU % | peak GiB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print(f"| torch | {t['step_ms']:.1f} | {t['tokens_per_sec']:,.0f} | {100 * t['mfu']:.1f} | "
              f"{_gib(t['peak_bytes'])} |")
        mha = next((r for r in (jax_result or {}).get("rows", [])
                    if r["kind"] == "mha" and r["mode"] == "off" and "step_ms" in r), None)
        if mha:
            print(f"| jax mha (off) | {mha['step_ms']:.1f} | {mha['tokens_per_sec']:,.0f} | "
                  f"{100 * mha['mfu']:.1f} | {_gib(mha['mem_plan'])} (plan) |")
            print(f"\nJAX mha / torch tokens/s: {mha['tokens_per_sec'] / t['tokens_per_sec']:.2f}x "
                  f"(params: jax {mha['params']:,}, torch {t['params']:,})")
    elif torch_error:
        print(f"\nPyTorch baseline: {torch_error}")


def main():
    args = parse_args()
    if args.part == "jax":
        print(RESULT + json.dumps(jax_part(args)), flush=True)
        return
    if args.part == "torch":
        print(RESULT + json.dumps(torch_part(args)), flush=True)
        return
    start = time.time()
    reserve = 0.0 if args.no_torch else args.torch_reserve
    jax_result, jax_error = _run_child(args, "jax", args.time_budget - reserve, sys.executable, grace=90)
    if jax_error:
        print(f"[bench] JAX part failed: {jax_error}", flush=True)
    torch_result, torch_error = None, "skipped (--no_torch)"
    if not args.no_torch:
        left = args.time_budget - (time.time() - start)
        if left < 30:
            torch_error = "skipped (time budget)"
        else:
            torch_result, torch_error = _run_child(args, "torch", left, args.torch_python, grace=30)
    print_tables(args, jax_result, torch_result, torch_error)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "jax": jax_result, "torch": torch_result,
                       "torch_error": torch_error}, f, indent=1)
    if jax_error:
        sys.exit(1)


if __name__ == "__main__":
    main()
