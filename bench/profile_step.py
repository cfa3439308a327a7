"""Where a train step's time goes: variants of one config timed side by side, and a kernel
table from a profiler trace.

    python -m bench.profile_step                                   # LLaMA-130M mha on the GPU
    python -m bench.profile_step --variants="base;train.microbatch_size=256"
    python -m bench.profile_step --tiny --steps=2                  # CPU check

Each variant is the base config (bench/throughput.py's: preset, seq, global batch,
microbatches, diagnostics off) with `;`-separated groups of `a.b=value` overrides
(`,` between overrides of one group). The variants compile on a thread pool, then run one at a
time: --warmup steps, then --steps timed. The first variant is then traced with
jax.profiler (a Perfetto trace, read back here): device kernels grouped by name, with the
share of the step each takes and how much of the step the device is busy at all. With
--traffic, the trace is joined with the bytes bench/gpu_traffic.py counts for each kernel of
the compiled step: which kernels run far below the memory bandwidth.

    python -m bench.profile_step --variants=base --traffic --hlo_out=$OUT
"""
import argparse
import collections
import concurrent.futures
import glob
import gzip
import json
import os
import re
import tempfile
import time

from bench import gpu_traffic, throughput
from bench.variants import add_step_args, compile_step, variant_config

DEFAULT_VARIANTS = ";".join([
    "base",
    "train.microbatch_size=256",
    "train.microbatch_size=0",
    "train.loss_chunk_tokens=0",
    "train.loss_one_pass=False",
    "model.attention_impl=xla",
    "model.attention.rope_fraction=0.0",
])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--kind", default="mha", choices=list(throughput.KINDS))
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trace_steps", type=int, default=3, help="steps traced (0 = no trace)")
    p.add_argument("--top", type=int, default=30, help="kernel rows printed")
    p.add_argument("--peak_flops", type=float, default=989e12)
    p.add_argument("--traffic", action="store_true",
                   help="join the trace with the bytes of each kernel of the compiled step "
                   "(bench/gpu_traffic.py): measured ms and TB/s by source")
    p.add_argument("--hlo_out", default="", help="write each variant's optimized HLO here (.hlo.gz)")
    args = p.parse_args(argv)
    return add_step_args(args, args.tiny)


def kernel_group(name: str) -> str:
    lower = name.lower()
    if any(k in lower for k in ("sdpa", "flash", "cudnn")):
        return "attention (cuDNN)"
    if any(k in lower for k in ("nvjet", "gemm", "cutlass", "cublas", "sm90_xmma", "triton_gemm")):
        return "matmul"
    if "memcpy" in lower or "memset" in lower:
        return "copies"
    return "other (fusions)"


def trace_kernels(trace_dir: str):
    """({kernel name: [µs, launches]}, [(start, end) µs]) of the device events of a Perfetto
    trace; ({}, []) if there is none."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return {}, []
    with gzip.open(files[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process.items() if "/device:" in name and "CPU" not in name}
    by_name = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            by_name[e["name"]][0] += e["dur"]
            by_name[e["name"]][1] += 1
            intervals.append((e["ts"], e["ts"] + e["dur"]))
    return dict(by_name), sorted(intervals)


def kernel_table(by_name, intervals, steps: int, top: int) -> str:
    """Device kernels grouped by name: ms per step and share of the step."""
    if not intervals:
        return "no device events in the trace"
    busy, end = 0.0, -1e30
    for start, stop in intervals:   # union of the kernels' intervals over every stream
        if start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    span = intervals[-1][1] - intervals[0][0]
    total = sum(v[0] for v in by_name.values())
    lines = [f"trace: {len(intervals)} device events in {span / 1e3:.1f} ms over {steps} steps; device "
             f"busy {busy / 1e3 / steps:.1f} ms/step ({100 * busy / span:.1f}% of the span), kernel "
             f"time {total / 1e3 / steps:.1f} ms/step",
             "| kernel | ms/step | % of kernel time | calls/step |", "| --- | ---: | ---: | ---: |"]
    groups = collections.defaultdict(float)
    for name, (dur, _) in by_name.items():
        groups[kernel_group(name)] += dur
    lines.append("groups: " + ", ".join(f"{g} {d / 1e3 / steps:.1f} ms ({100 * d / total:.0f}%)"
                                         for g, d in sorted(groups.items(), key=lambda kv: -kv[1])))
    for name, (dur, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {name[:90]} | {dur / 1e3 / steps:.2f} | {100 * dur / total:.1f} | "
                     f"{count / steps:.0f} |")
    return "\n".join(lines)


def _kernel_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", name)   # a kernel is named after its HLO op, '.' -> '_'


def traffic_table(hlo_text: str, by_name, steps: int, top: int, bandwidth: float = 3.0e12) -> str:
    """The memory-bound kernels of the trace joined with the bytes bench/gpu_traffic.py counts in
    the compiled step: measured ms and achieved TB/s by source, and the kernels furthest from
    `bandwidth`. A kernel that several identical fusions share is split among their sources by
    bytes."""
    rows = [r for r in gpu_traffic.kernels(hlo_text) if r["kind"] not in ("matmul", "attention (cuDNN)")]
    kernel_of = {_kernel_key(r["name"]): r["kernel"] for r in rows}
    members = collections.defaultdict(list)
    for r in rows:
        members[r["kernel"]].append(r)
    by_source = collections.defaultdict(lambda: [0.0, 0.0, 0.0])   # launches, bytes, ms
    slow, unmatched = [], 0.0
    for name, (dur, count) in by_name.items():
        ms = dur / 1e3 / steps
        kernel = kernel_of.get(_kernel_key(name))
        if kernel is None:
            unmatched += ms if kernel_group(name) == "other (fusions)" else 0.0
            continue
        group = members[kernel]
        nbytes = sum(r["bytes"] for r in group)
        for r in group:
            share = r["bytes"] / nbytes if nbytes else 1.0 / len(group)
            by_source[r["source"]][0] += r["calls"]
            by_source[r["source"]][1] += r["bytes"]
            by_source[r["source"]][2] += ms * share
        sources = collections.Counter(r["source"] for r in group).most_common(2)
        slow.append((ms - 1e3 * nbytes / bandwidth, ms, name, " + ".join(s for s, _ in sources),
                     group[0]["result"], count / steps, sum(r["calls"] for r in group)))
    total_ms = sum(g[2] for g in by_source.values())
    total_gb = sum(g[1] for g in by_source.values()) / 1e9
    lines = [f"memory-bound kernels found in the HLO: {total_ms:.1f} ms/step, {total_gb:.1f} GB, "
             f"{total_gb / max(total_ms, 1e-9):.2f} TB/s; fusion kernels not found: {unmatched:.1f} ms",
             f"| source | launches | GB | ms | TB/s | ms at {bandwidth / 1e12:.1f} TB/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for source, (calls, nbytes, ms) in sorted(by_source.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"| {source} | {calls:.0f} | {nbytes / 1e9:.1f} | {ms:.2f} | "
                     f"{nbytes / 1e9 / max(ms, 1e-9):.2f} | {1e3 * nbytes / bandwidth:.2f} |")
    lines += ["", "kernels furthest from that rate (launches per step: traced / in the HLO):",
              "| kernel | source | result | launches | ms | above |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    for excess, ms, name, source, result, traced, planned in sorted(slow, key=lambda t: -t[0])[:top]:
        lines.append(f"| {name} | {source} | {result[:60]} | {traced:.0f} / {planned:.0f} | "
                     f"{ms:.2f} | {excess:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from mla_rmt import config_check, sharding  # pylint: disable=import-outside-toplevel
    from mla_rmt.step import make_trainer  # pylint: disable=import-outside-toplevel
    from mla_rmt.model import flops_per_token  # pylint: disable=import-outside-toplevel

    specs = [s.strip() for s in args.variants.split(";") if s.strip()]
    built = {}
    for spec in specs:
        config = variant_config(args, spec)
        cfg = config_check.validate(config)
        mesh = sharding.make_mesh(config.mesh)
        built[spec] = (config, cfg, mesh, make_trainer(config, cfg, mesh))

    def compile_one(spec):
        config, _, mesh, trainer = built[spec]
        t0 = time.perf_counter()
        return compile_step(config, mesh, trainer), time.perf_counter() - t0

    print(f"{jax.devices()[0].device_kind} x {len(jax.devices())}; {throughput._versions_jax()}",
          flush=True)
    compiled = {}
    workers = max(1, min(8, (os.cpu_count() or 2) // 2, len(specs)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(compile_one, spec): spec for spec in specs}
        for future in concurrent.futures.as_completed(futures):
            spec = futures[future]
            try:
                compiled[spec] = future.result()
                print(f"compiled {spec} in {compiled[spec][1]:.1f}s", flush=True)
                if args.hlo_out:
                    path = os.path.join(args.hlo_out, f"step_{specs.index(spec)}.hlo.gz")
                    with gzip.open(path, "wt") as f:
                        f.write(f"// {spec}\n" + compiled[spec][0].as_text())
            except Exception as e:  # pylint: disable=broad-except
                print(f"compile of {spec} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)

    rng = np.random.default_rng(0)
    rows = ["| variant | step ms | tokens/s | MFU % | mem GiB (plan) |", "| --- | ---: | ---: | ---: | ---: |"]
    for spec in specs:
        if spec not in compiled:
            rows.append(f"| {spec} | compile failed | | | |")
            continue
        config, cfg, mesh, trainer = built[spec]
        executable = compiled[spec][0]
        b, t = config.data.global_batch_size, config.data.seq_len
        tokens = rng.integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
        batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
        try:
            state = trainer.init_state(jax.random.key(0))
            for _ in range(args.warmup):
                state, metrics = executable(state, batch)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = executable(state, batch)
            jax.block_until_ready((state, metrics))
            seconds = (time.perf_counter() - t0) / args.steps
        except Exception as e:  # pylint: disable=broad-except
            rows.append(f"| {spec} | failed: {type(e).__name__} | | | |")
            print(f"{spec} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        tps = b * t / seconds
        mfu = tps * flops_per_token(cfg, t) / (args.peak_flops * len(jax.devices()))
        plan = throughput._memory_plan(executable)
        rows.append(f"| {spec} | {1e3 * seconds:.1f} | {tps:,.0f} | {100 * mfu:.1f} | "
                    f"{plan / 2**30 if plan else float('nan'):.2f} |")
        print(rows[-1], flush=True)
        if spec == specs[0] and args.trace_steps > 0:
            trace_dir = tempfile.mkdtemp(prefix="trace_")
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(args.trace_steps):
                    state, metrics = executable(state, batch)
                jax.block_until_ready((state, metrics))
            by_name, intervals = trace_kernels(trace_dir)
            if args.hlo_out:
                with open(os.path.join(args.hlo_out, "trace_kernels.json"), "w") as f:
                    json.dump(dict(steps=args.trace_steps, kernels=by_name), f)
            table = kernel_table(by_name, intervals, args.trace_steps, args.top)
            if args.traffic:
                table += "\n\n" + traffic_table(executable.as_text(), by_name, args.trace_steps,
                                                 args.top)
        del state
    print("\n".join(rows))
    if args.trace_steps > 0 and specs[0] in compiled:
        print(f"\nKernels of '{specs[0]}':\n{table}")


if __name__ == "__main__":
    main()
