"""bench/gpu_traffic.py's accounting on a hand-written optimized HLO module (no GPU plugin)."""

import pytest

from bench import gpu_traffic, profile_step

MLP = 'metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/closed_call/layers/mlp/mul"}'
LOSS = 'metadata={op_name="jit(train_step)/jvp(cross_entropy)/while/body/closed_call/exp"}'
GEMM_CONFIG = ('backend_config={"gemm_backend_config":{"dot_dimension_numbers":{'
               '"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
               '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}')

MODULE = f"""HloModule jit_train_step, is_scheduled=true

%fused_multiply (param_0: bf16[64,128], param_1: bf16[64,128]) -> f32[64,128] {{
  %param_0 = bf16[64,128]{{1,0}} parameter(0)
  %param_1 = bf16[64,128]{{1,0}} parameter(1)
  %multiply.1 = bf16[64,128]{{1,0}} multiply(%param_0, %param_1), {MLP}
  ROOT %convert.1 = f32[64,128]{{1,0}} convert(%multiply.1), {MLP}
}}

%fused_slice_exp (param_0.1: f32[4,256], param_1.1: s32[]) -> f32[1,256] {{
  %param_0.1 = f32[4,256]{{1,0}} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant.0 = s32[] constant(0)
  %bitcast.0 = f32[4,256]{{1,0}} bitcast(%param_0.1)
  %dynamic-slice.1 = f32[1,256]{{1,0}} dynamic-slice(%bitcast.0, %param_1.1, %constant.0), dynamic_slice_sizes={{1,256}}, {LOSS}
  ROOT %exponential.1 = f32[1,256]{{1,0}} exponential(%dynamic-slice.1), {LOSS}
}}

%fused_update (param_0.2: f32[4,256], param_1.2: f32[1,256], param_2.2: s32[]) -> f32[4,256] {{
  %param_0.2 = f32[4,256]{{1,0}} parameter(0)
  %param_1.2 = f32[1,256]{{1,0}} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,256]{{1,0}} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %constant.1), {LOSS}
}}

%body (loop: (s32[], f32[4,256], f32[4,256])) -> (s32[], f32[4,256], f32[4,256]) {{
  %loop = (s32[], f32[4,256]{{1,0}}, f32[4,256]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %xs = f32[4,256]{{1,0}} get-tuple-element(%loop), index=1
  %ys = f32[4,256]{{1,0}} get-tuple-element(%loop), index=2
  %row = f32[1,256]{{1,0}} fusion(%xs, %i), kind=kLoop, calls=%fused_slice_exp
  %ys.1 = f32[4,256]{{1,0}} fusion(%ys, %row, %i), kind=kLoop, calls=%fused_update
  ROOT %next = (s32[], f32[4,256]{{1,0}}, f32[4,256]{{1,0}}) tuple(%i, %xs, %ys.1)
}}

%cond (loop.1: (s32[], f32[4,256], f32[4,256])) -> pred[] {{
  %loop.1 = (s32[], f32[4,256]{{1,0}}, f32[4,256]{{1,0}}) parameter(0)
  ROOT %true = pred[] constant(true)
}}

ENTRY %main (a: bf16[64,128], b: bf16[128,32], xs.0: f32[4,256]) -> f32[64,128] {{
  %a = bf16[64,128]{{1,0}} parameter(0)
  %b = bf16[128,32]{{1,0}} parameter(1)
  %xs.0 = f32[4,256]{{1,0}} parameter(2)
  %gemm = (bf16[64,32]{{1,0}}, s8[1024]{{0}}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", {GEMM_CONFIG}
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,256]{{1,0}}, f32[4,256]{{1,0}}) tuple(%zero, %xs.0, %xs.0)
  %loop.2 = (s32[], f32[4,256]{{1,0}}, f32[4,256]{{1,0}}) while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"4"}}}}
  ROOT %product = f32[64,128]{{1,0}} fusion(%a, %a), kind=kLoop, calls=%fused_multiply
}}
"""


@pytest.fixture(scope="module")
def rows():
    return gpu_traffic.kernels(MODULE)


def test_fusion_bytes_are_its_operands_and_result(rows):
    [product] = [r for r in rows if r["source"] == "backward: mlp"]
    assert product["bytes"] == 2 * (64 * 128 * 2) + 64 * 128 * 4 and product["calls"] == 1


def test_loop_kernels_count_once_per_trip_and_slices_count_the_slice(rows):
    loss = [r for r in rows if r["source"] == "forward: cross_entropy"]
    assert sorted(r["calls"] for r in loss) == [4, 4]
    # slice + exp: reads one 256-float row of the 4-row operand and the s32 index, writes one
    # row; the in-place update: reads and writes the updated row only (the buffer is not copied).
    per_trip = 2 * 256 * 4 + 4
    assert sorted(r["bytes"] for r in loss) == [4 * per_trip, 4 * per_trip]


def test_matmul_flops_and_bytes(rows):
    [gemm] = [r for r in rows if r["kind"] == "matmul"]
    assert gemm["flops"] == 2 * 64 * 32 * 128
    assert gemm["bytes"] == 64 * 128 * 2 + 128 * 32 * 2 + 64 * 32 * 2 + 1024


@pytest.mark.parametrize("op_name, source", [
    ("jit(train_step)/jvp(Transformer)/closed_call/layers/attention/attention.qkv/attention.rotate/mul",
     "forward: attention/attention.qkv/attention.rotate"),
    ("jit(train_step)/transpose(jvp(Transformer))/closed_call/layers/mlp_norm/mul", "backward: mlp_norm"),
    ("jit(train_step)/transpose(jvp(Transformer))/closed_call/layers/mlp/jit(silu)/mul", "backward: mlp/silu"),
    ("jit(train_step)/add", "update: (top level)"),
])
def test_source_names_phase_and_module(op_name, source):
    assert gpu_traffic._source([op_name]) == source  # pylint: disable=protected-access


def test_report_totals(rows):
    args = gpu_traffic.parse_args(["--bandwidth=1e9", "--gemm_tflops=1"])
    _, totals = gpu_traffic.report(rows, args)
    memory = sum(r["bytes"] for r in rows if r["kind"] != "matmul")
    assert totals["memory_gb"] == pytest.approx(memory / 1e9)
    assert totals["memory_ms"] == pytest.approx(1e3 * memory / 1e9)
    assert totals["gemm_ms"] == pytest.approx(1e3 * 2 * 64 * 32 * 128 / 1e12)


def test_trace_join_measures_each_source():
    # Two traced steps: kernels named as the device names them ('.' -> '_'), durations in µs.
    by_name = {"product": [3000.0, 2], "row": [800.0, 8], "ys_1": [200.0, 8],
               "nvjet_gemm_kernel": [5000.0, 2], "loop_add_fusion_9": [600.0, 2]}
    table = profile_step.traffic_table(MODULE, by_name, steps=2, top=10, bandwidth=1e9)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    product_bytes = 2 * (64 * 128 * 2) + 64 * 128 * 4
    cells = [c.strip() for c in lines["backward: mlp"].strip("|").split("|")]
    assert cells[1:] == ["1", f"{product_bytes / 1e9:.1f}", "1.50",
                         f"{product_bytes / 1e9 / 1.5:.2f}", f"{1e3 * product_bytes / 1e9:.2f}"]
    loss = [c.strip() for c in lines["forward: cross_entropy"].strip("|").split("|")]
    assert loss[1] == "8" and loss[3] == "0.50"            # (800 + 200) µs over 2 steps
    assert "fusion kernels not found: 0.3 ms" in table      # loop_add_fusion_9, not the gemm


def test_trace_join_splits_a_shared_kernel_among_its_fusions():
    """Identical fusions share one kernel (deduplicated_name); the trace names it after one."""
    fwd = MLP.replace("transpose(jvp(Transformer))", "jvp(Transformer)")
    module = f"""HloModule m, is_scheduled=true

%fused_a (p0: bf16[64,128], p1: bf16[64,128]) -> bf16[64,128] {{
  %p0 = bf16[64,128]{{1,0}} parameter(0)
  %p1 = bf16[64,128]{{1,0}} parameter(1)
  ROOT %m0 = bf16[64,128]{{1,0}} multiply(%p0, %p1), {fwd}
}}

%fused_b (q0: bf16[64,128], q1: bf16[64,128]) -> bf16[64,128] {{
  %q0 = bf16[64,128]{{1,0}} parameter(0)
  %q1 = bf16[64,128]{{1,0}} parameter(1)
  ROOT %m1 = bf16[64,128]{{1,0}} multiply(%q0, %q1), {MLP}
}}

ENTRY %main (a: bf16[64,128], b: bf16[64,128]) -> bf16[64,128] {{
  %a = bf16[64,128]{{1,0}} parameter(0)
  %b = bf16[64,128]{{1,0}} parameter(1)
  %f.1 = bf16[64,128]{{1,0}} fusion(%a, %b), kind=kLoop, calls=%fused_a, metadata={{deduplicated_name="f"}}
  ROOT %f.2 = bf16[64,128]{{1,0}} fusion(%a, %f.1), kind=kLoop, calls=%fused_b, metadata={{deduplicated_name="f"}}
}}
"""
    table = profile_step.traffic_table(module, {"f_2": [4000.0, 2]}, steps=1, top=10, bandwidth=1e9)
    rows = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| forward") or line.startswith("| backward")}
    assert rows["forward: mlp"][1:4] == ["1", "0.0", "2.00"]      # half the bytes, half the 4 ms
    assert rows["backward: mlp"][1:4] == ["1", "0.0", "2.00"]
    assert "| f_2 | " in table and "| 2 / 2 |" in table        # launches: traced / in the HLO
