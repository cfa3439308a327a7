"""Shared test set-up: one data/tokenizer cache per test session, inherited by subprocesses."""
import atexit
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import threadpoolctl
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _keep_to_own_cores():
    """Each pytest-xdist worker, and every process it starts, runs on its own share of the CPUs
    with one BLAS thread per CPU: thread pools sized for the whole machine (XLA's, OpenBLAS's)
    would otherwise spin on the core the other worker is using (BENCHMARKS.md, "The test suite")."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    mine = cpus[index::count] if count < len(cpus) else [cpus[index % len(cpus)]]
    os.sched_setaffinity(0, mine)                  # before jax sizes its thread pool
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(len(mine))
    threadpoolctl.threadpool_limits(len(mine))     # numpy is loaded already


_keep_to_own_cores()

# One XLA compilation cache for the session and every `python -m mla_rmt.main` it starts: the
# same tiny models are compiled in many processes, and a cached executable is the same binary,
# so results stay bit-identical. Set before any test module imports jax; subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="mla_rmt_jax_cache_")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The suite is bound by XLA's CPU compilations of small programs, not by running them. LLVM at
# -O0 instead of -O2 and XLA's loop emitters for fusions instead of its newer fusion emitters
# compile them several times faster and run them slower (BENCHMARKS.md, "The test suite").
# Numerics under test are compared with references or with themselves within one setting;
# tests/test_golden.py records its values under this one.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# A run bound by its steps rather than its compilation (the README's trial of 150 steps) is
# started under -O1, which compiles slower and steps faster.
STEP_BOUND_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"


def _xla_accepts(xla_flags: str) -> bool:
    """XLA aborts a process that sets a flag it does not know: try the flags in a child first."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=120)
    return probe.returncode == 0


_WITH_FAST_COMPILE = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
if FAST_COMPILE_FLAGS in os.environ.get("XLA_FLAGS", ""):      # set by the session that started us
    TEST_XLA_FLAGS = FAST_COMPILE_FLAGS
elif _xla_accepts(_WITH_FAST_COMPILE):
    TEST_XLA_FLAGS = FAST_COMPILE_FLAGS
    os.environ["XLA_FLAGS"] = _WITH_FAST_COMPILE
else:
    TEST_XLA_FLAGS = ""
    print(f"conftest: this jaxlib refuses XLA_FLAGS {FAST_COMPILE_FLAGS!r}; the suite compiles "
          "with XLA's defaults (slower)", file=sys.stderr)


def step_bound_env() -> dict:
    """The environment for a subprocess that trains many steps: the suite's, under -O1."""
    if not TEST_XLA_FLAGS:
        return dict(os.environ)
    return dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(FAST_COMPILE_FLAGS,
                                                                      STEP_BOUND_FLAGS))


# Session fixtures every pytest-xdist worker may build for itself (cheap, used by every test).
PER_WORKER = {"data_cache"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup`, the tests that share a module- or session-scoped
    fixture (a training run) run on one worker, so it is built once: one group per fixture of
    this file (e.g. the tiny sweep), one per test module for a module's own fixtures."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        shared = sorted(
            d.baseid if d.baseid.endswith(".py") else d.argname
            for d in (defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values())  # pylint: disable=protected-access
            if d.scope != "function" and d.baseid and d.argname not in PER_WORKER)
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[-1]))


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """The embedded corpus and its tokenizer are built once per session, here."""
    cache = os.environ.get("MLA_RMT_TEST_CACHE") or str(tmp_path_factory.mktemp("mla_rmt_cache"))
    os.environ["MLA_RMT_CACHE"] = cache
    return pathlib.Path(cache)


@pytest.fixture
def rng():
    """Fresh random inputs on every run; MLA_RMT_TEST_SEED=<seed> replays the seed printed here
    (pytest shows it when the test fails)."""
    seed = int(os.environ.get("MLA_RMT_TEST_SEED") or np.random.SeedSequence().entropy % 2**63)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _reset_flags():
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:   # the overrides' flags,
        delattr(flags.FLAGS, name)                  # defined while parsing: again next time


@pytest.fixture
def parse(monkeypatch):
    """mla_rmt.main's flag parser on the global flags, in this process, afresh at each call; the
    flags and the SIGINT handler main installs are reset afterwards (config_flags reads the
    overrides from sys.argv, as under app.run)."""
    from mla_rmt import main  # pylint: disable=import-outside-toplevel  (defines the flags)

    def run(*args):
        _reset_flags()
        monkeypatch.setattr(sys, "argv", ["main", *args])
        return main._parse_flags(sys.argv)  # pylint: disable=protected-access
    sigint = signal.getsignal(signal.SIGINT)
    yield run
    signal.signal(signal.SIGINT, sigint)
    _reset_flags()


def init_params(model, key, tokens):
    """The model's unboxed params, its init compiled as one program (an eager init compiles
    every random draw on its own)."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel  (jax after the set-up above)
    import jax  # pylint: disable=import-outside-toplevel
    return jax.jit(lambda key: nn.meta.unbox(model.init(key, tokens)["params"]))(key)


# A trial small enough for a test: the tiny model on short sequences, its layers under a rolled
# scan, which compiles faster (tests/test_model.py holds it to the unrolled default's numbers),
# computing in float32, which a CPU runs without converting to and from bfloat16 (the default
# bfloat16 trains in tests/test_quickstart.py and tests/test_golden.py; BENCHMARKS.md, "The
# test suite").
FAST_OVERRIDES = {"data.seq_len": 32, "data.global_batch_size": 8, "train.eval_batches": 2,
                  "model.scan_unroll": 1, "model.dtype": "float32"}
FAST = tuple(f"--config.{field}={value}" for field, value in FAST_OVERRIDES.items())


def main_command(workdir, *overrides, config="configs/llama.py:tiny"):
    return [sys.executable, "-m", "mla_rmt.main", f"--config={REPO / config}",
            f"--workdir={workdir}", *FAST, *overrides]


def run_main(workdir, *overrides, config="configs/llama.py:tiny", timeout=600):
    """Runs the real entry point in a fresh process; returns the CompletedProcess."""
    return subprocess.run(main_command(workdir, *overrides, config=config), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file in logdir; a re-logged step keeps its last value."""
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    out: dict[str, dict[int, float]] = {}
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                out.setdefault(tag, {})[event.step] = event.value
    return out


# The tiny RoPE-budget sweep, shortened: one trial of each kind (mha, mla_prerope and
# mla_decoupled at rope fractions 0.25, 0.5, 0.5, and NoPE) for 20 steps with spectra and probes
# every 5 steps, images every 10.
TINY_SWEEP_TRIALS = (0, 4, 7, 9)
TINY_SWEEP = ("--config.train.num_steps=20", "--config.train.log_every=5",
              "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
              "--config.diagnostics.every=5", "--config.diagnostics.images_every=10",
              f"--trial={','.join(map(str, TINY_SWEEP_TRIALS))}")


@pytest.fixture(scope="session")
def tiny_sweep_workdir(tmp_path_factory, data_cache):
    """A finished run of four trials of `configs/rope_budget_sweep.py:tiny`, shared by tests."""
    del data_cache
    workdir = tmp_path_factory.mktemp("tiny_sweep")
    proc = run_main(workdir, *TINY_SWEEP, config="configs/rope_budget_sweep.py:tiny", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir
