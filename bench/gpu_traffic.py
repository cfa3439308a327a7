"""Memory traffic and matmul FLOPs of the train step compiled for an H100, on a machine
without a GPU: where a change to the model moves bytes, before any GPU time is spent.

    pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"   # no GPU needed
    python -m bench.gpu_traffic                                   # LLaMA-130M mha, whole batch
    python -m bench.gpu_traffic --variants="base;train.loss_chunk_tokens=0" --top=20
    python -m bench.gpu_traffic --dump=/tmp/step.hlo               # also keep the HLO text

JAX compiles the step ahead of time against a described device (`--target`, an XLA
GpuTargetConfig text proto) instead of a present one (`jax.experimental.topologies`), with
XLA's Triton matmuls off: without a device there is no autotuning, and on the H100 the
autotuner picks cuBLAS for every matmul of this model (bench/profile_step.py's kernel table),
so the fusions around them are the ones the device runs. XLA versions differ in their fusion
choices, so compare variants compiled by the same jax.

Each top-level kernel of the optimized HLO (inside while loops: times the trip count; the
branches of conditionals, such as the spectra's, are left out) is
counted as the bytes of its operands and results (a slice or dynamic-slice of an operand
counts the slice, an in-place dynamic-update-slice the update), grouped by the source of the
fused code (forward / backward / update, and the module path from the op metadata). The
estimate: matmul FLOPs at --gemm_tflops, the rest at --bandwidth; cuDNN attention is
listed by bytes only.
"""
import argparse
import collections
import os
import re
import sys
import time

from bench.variants import add_step_args, compile_step, variant_config

DEFAULT_TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h100_target.txtpb")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
            "partition-id", "replica-id", "opt-barrier", "add-dependency"}
WRAPPERS = re.compile(r"^(jit\(train_step\)|jvp\(.*\)|transpose\(.*\)|closed_call|while|body|cond|"
                      r"checkpoint|remat|rematted_computation|pjit)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--kind", default="mha")
    p.add_argument("--variants", default="base",
                   help="';'-separated groups of a.b=value overrides (',' within a group), as in "
                   "bench/profile_step.py; 'base' is its config with --microbatch")
    p.add_argument("--microbatch", type=int, default=0,
                   help="rows per microbatch (0: the whole batch of 512, as the kernel table of "
                   "BENCHMARKS.md was traced)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="GpuTargetConfig text proto")
    p.add_argument("--gemm_tflops", type=float, default=735.0,
                   help="matmul rate for the estimate (735: cuBLAS on the H100 for this step)")
    p.add_argument("--bandwidth", type=float, default=3.0e12,
                   help="bytes/s of the memory-bound kernels for the estimate (H100 HBM3 peak 3.35e12)")
    p.add_argument("--top", type=int, default=15, help="rows of the by-source table per variant")
    p.add_argument("--dump", default="", help="write the optimized HLO of the first variant here")
    return p.parse_args(argv)


# HLO text ------------------------------------------------------------------------------------

def array_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in ARRAY.findall(type_text):
        size = DTYPE_BYTES.get(dtype, 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def parse_hlo(text: str):
    """{computation: [instruction dicts]}, entry name. Instructions: name, type, op, operands,
    attrs (the text after the operand list), root."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        if not line.startswith(" "):
            header = re.match(r"^(ENTRY\s+)?%(\S+)\s*\(.*\{\s*$", line)
            if header:
                current = header.group(2)
                computations[current] = []
                entry = current if header.group(1) else entry
            elif line.startswith("}"):
                current = None
            continue
        head = re.match(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*", line)
        if current is None or not head:
            continue
        rest = line[head.end():]
        if rest.startswith("("):
            end = _closing(rest, 0)
            type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            type_text, rest = rest.split(" ", 1)
        open_paren = rest.index("(")
        close_paren = _closing(rest, open_paren)
        computations[current].append(dict(
            name=head.group(2), type=type_text, op=rest[:open_paren],
            operands=re.findall(r"%([\w.\-]+)", rest[open_paren:close_paren + 1]),
            attrs=rest[close_paren + 1:], root=bool(head.group(1))))
    return computations, entry


def _fused_bytes(computations, callee: str, result_type: str) -> int:
    """Bytes a fusion reads and writes: parameters read only through slices or gathers count
    what those take (a fused slice reads only its elements); a dynamic-update-slice root writes
    (and reads) only its update."""
    body = computations[callee]
    by_name = {i["name"]: i for i in body}
    users = collections.defaultdict(list)
    for inst in body:
        for operand in inst["operands"]:
            users[operand].append(inst)
    def uses_of(name):   # (user, operand name) pairs, looking through bitcasts and converts
        for user in users[name]:
            if user["op"] in ("bitcast", "convert", "reshape"):
                yield from uses_of(user["name"])
            else:
                yield user, name

    root = next(i for i in body if i["root"])
    in_place = root["op"] == "dynamic-update-slice"
    read = 0
    for inst in body:
        if inst["op"] != "parameter":
            continue
        uses = list(uses_of(inst["name"]))
        if in_place and [u for u, _ in uses] == [root] and root["operands"][0] == uses[0][1]:
            continue  # the buffer updated in place
        if uses and all(u["op"] in ("slice", "dynamic-slice", "gather") and u["operands"][0] == via
                        for u, via in uses):
            read += sum(array_bytes(u["type"]) for u, _ in uses)
        else:
            read += array_bytes(inst["type"])
    written = array_bytes(by_name[root["operands"][1]]["type"]) if in_place else array_bytes(result_type)
    return read + written


def _gemm_flops(inst, shapes) -> float:
    lhs = ARRAY.search(shapes[inst["operands"][0]])
    lhs_dims = [int(d) for d in lhs.group(2).split(",") if d]
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst["attrs"])
    k = 1
    for d in re.findall(r"\d+", contracting.group(1)) if contracting else []:
        k *= lhs_dims[int(d)]
    out = ARRAY.search(inst["type"])   # the first array of the result: the product
    n = 1
    for d in filter(None, out.group(2).split(",")):
        n *= int(d)
    return 2.0 * n * k


def _source(names) -> str:
    """'forward|backward|update: module/path' from the ops' metadata op_names."""
    if not names:
        return "(no op metadata)"
    name = collections.Counter(names).most_common(1)[0][0]
    phase = "backward" if "transpose(" in name else "forward" if "jvp(" in name else "update"
    parts = []
    for part in name.split("/")[:-1]:                       # the last is the primitive
        scope = re.match(r"^(?:transpose\()?jvp\(([^()]*)\)\)?$", part)   # jvp(named scope)
        if scope:
            parts += [scope.group(1)] if scope.group(1) not in ("", "Transformer") else []
        elif not WRAPPERS.match(part) and part != "layers":
            parts.append(re.sub(r"^jit\((.*)\)$", r"\1", part))
    return f"{phase}: {'/'.join(parts[:3]) or '(top level)'}"


def kernels(text: str):
    """One row per kernel launch group: dict(name, kernel, result, kind, source, bytes, flops,
    calls). name is the HLO instruction's; kernel names the compiled kernel it launches, which
    fusions of identical code share (XLA's deduplicated_name) and a trace names after one of them."""
    computations, entry = parse_hlo(text)
    rows = []

    def walk(name, times):
        shapes = {i["name"]: i["type"] for i in computations[name]}
        for inst in computations[name]:
            op = inst["op"]
            if op in FREE_OPS or op in ("conditional", "call"):
                continue
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", inst["attrs"]).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst["attrs"])
                walk(body, times * (int(trips.group(1)) if trips else 1))
                continue
            op_names = re.findall(r'op_name="([^"]+)"', inst["attrs"])
            flops = 0.0
            if op == "fusion":
                callee = re.search(r"calls=%([\w.\-]+)", inst["attrs"]).group(1)
                nbytes = _fused_bytes(computations, callee, inst["type"])
                op_names += [n for i in computations[callee]
                             for n in re.findall(r'op_name="([^"]+)"', i["attrs"])]
                kind = "fusion"
            else:
                nbytes = array_bytes(inst["type"]) + sum(array_bytes(shapes.get(o, ""))
                                                         for o in inst["operands"])
                target = re.search(r'custom_call_target="([^"]+)"', inst["attrs"])
                target = target.group(1) if target else op
                kind = ("matmul" if "gemm" in target or "matmul" in target or "cublas" in target
                        else "attention (cuDNN)" if "cudnn" in target else op)
                if kind == "matmul":
                    flops = _gemm_flops(inst, shapes)
            shared = re.search(r'deduplicated_name="([^"]+)"', inst["attrs"])
            rows.append(dict(name=inst["name"], kernel=shared.group(1) if shared else inst["name"],
                             result=inst["type"], kind=kind, source=_source(op_names),
                             bytes=nbytes * times, flops=flops * times, calls=times))

    walk(entry, 1)
    return rows


# The step ------------------------------------------------------------------------------------

def compile_step_hlo(args, spec: str, topology) -> str:
    from mla_rmt import config_check, sharding  # pylint: disable=import-outside-toplevel
    from mla_rmt.step import make_trainer  # pylint: disable=import-outside-toplevel

    base = add_step_args(argparse.Namespace(kind=args.kind))
    base.microbatch = args.microbatch
    config = variant_config(base, spec)
    if config.model.attention_impl == "auto":   # what "auto" picks on a GPU (this process has none)
        config.model.attention_impl = "cudnn"
    cfg = config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices=topology.devices)
    return compile_step(config, mesh, make_trainer(config, cfg, mesh)).as_text()


def report(rows, args) -> tuple[str, dict]:
    by_kind = collections.defaultdict(lambda: [0.0, 0.0, 0])
    by_source = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        by_kind[r["kind"]][0] += r["bytes"]
        by_kind[r["kind"]][1] += r["flops"]
        by_kind[r["kind"]][2] += r["calls"]
        if r["kind"] not in ("matmul", "attention (cuDNN)"):
            by_source[r["source"]][0] += r["bytes"]
            by_source[r["source"]][1] += r["calls"]
    memory = sum(v[0] for k, v in by_kind.items() if k not in ("matmul", "attention (cuDNN)"))
    gemm_flops = by_kind["matmul"][1]
    totals = dict(memory_gb=memory / 1e9, memory_ms=1e3 * memory / args.bandwidth,
                  gemm_tflop=gemm_flops / 1e12, gemm_ms=1e3 * gemm_flops / (args.gemm_tflops * 1e12),
                  kernels=sum(v[2] for v in by_kind.values()))
    lines = ["| kernels | launches | GB moved | matmul TFLOP |", "| --- | ---: | ---: | ---: |"]
    for kind, (nbytes, flops, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {kind} | {calls} | {nbytes / 1e9:.1f} | {flops / 1e12:.2f} |" if flops
                     else f"| {kind} | {calls} | {nbytes / 1e9:.1f} | |")
    lines += ["", f"memory-bound kernels (everything but matmuls and cuDNN attention), by source; "
              f"ms at {args.bandwidth / 1e12:.2f} TB/s:",
              "| source | launches | GB | ms |", "| --- | ---: | ---: | ---: |"]
    for source, (nbytes, calls) in sorted(by_source.items(), key=lambda kv: -kv[1][0])[:args.top]:
        lines.append(f"| {source} | {calls} | {nbytes / 1e9:.1f} | {1e3 * nbytes / args.bandwidth:.1f} |")
    return "\n".join(lines), totals


def main(argv=None):
    args = parse_args(argv)
    # Matmuls as cuBLAS calls, as the autotuner chooses on the device; set before jax loads.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")
    with open(args.target) as f:
        target = f.read()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
    except Exception as e:  # pylint: disable=broad-except
        sys.exit(f"cannot describe a CUDA device ({type(e).__name__}: {e}); this needs the CUDA "
                 f"plugin of this jax: pip install \"jax[cuda13]=={jax.__version__}\"")
    print(f"jax {jax.__version__}, compiled for {topology.devices[0].device_kind} ({args.target})")
    summary = ["| variant | GB moved (memory-bound) | est. ms | matmul TFLOP | est. ms | kernels |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i, spec in enumerate(s.strip() for s in args.variants.split(";") if s.strip()):
        t0 = time.perf_counter()
        text = compile_step_hlo(args, spec, topology)
        if i == 0 and args.dump:
            with open(args.dump, "w") as f:
                f.write(text)
        table, t = report(kernels(text), args)
        print(f"\n## {spec} (compiled in {time.perf_counter() - t0:.1f}s)\n{table}", flush=True)
        summary.append(f"| {spec} | {t['memory_gb']:.1f} | {t['memory_ms']:.1f} | "
                       f"{t['gemm_tflop']:.1f} | {t['gemm_ms']:.1f} | {t['kernels']} |")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
