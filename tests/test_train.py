"""The trainer end to end through `python -m mla_rmt.main`: resume, preemption, NaN, summaries."""
import math
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, main_command, read_scalars, run_main

STEPS = 40
COMMON = (f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=10", "--config.train.eval_every=20",
          "--config.train.peak_flops_per_device=1e12")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_main(workdir, *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def _restore_all(workdir):
    """Every kept checkpoint restores to finite parameters (none is corrupt)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    steps = list(manager.all_steps())
    for step in steps:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        leaves = jax.tree.leaves(restored.state["params"])
        assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves), step
    return steps


def test_summaries_have_train_eval_perf_tags(uninterrupted):
    workdir, _ = uninterrupted
    scalars = read_scalars(workdir)
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss",
                "eval/perplexity", "perf/tokens_per_sec", "perf/mfu"):
        assert tag in scalars, f"missing {tag}; have {sorted(scalars)}"
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert sorted(scalars["train/loss"]) == list(range(1, STEPS + 1))
    assert sorted(scalars["eval/loss"]) == [20, 40]
    assert math.isclose(scalars["eval/perplexity"][40], math.exp(scalars["eval/loss"][40]), rel_tol=1e-5)
    assert scalars["train/loss"][STEPS] < scalars["train/loss"][1]
    assert (workdir / "result.json").exists()


def test_log_reports_progress(uninterrupted):
    _, proc = uninterrupted
    assert "tok/s" in proc.stderr and "ETA" in proc.stderr and "parameters" in proc.stderr


def test_sigkill_then_resume_reproduces_losses(uninterrupted, tmp_path):
    reference = read_scalars(uninterrupted[0])["train/loss"]
    proc = subprocess.Popen(main_command(tmp_path, *COMMON), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "20").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept_after_kill = _restore_all(tmp_path)
    assert 20 in kept_after_kill and STEPS not in kept_after_kill

    resumed = run_main(tmp_path, *COMMON)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint at step" in resumed.stderr
    losses = read_scalars(tmp_path)["train/loss"]
    assert sorted(losses) == sorted(reference)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference[s] for s in sorted(reference)], rtol=0, atol=1e-6)
    assert STEPS in _restore_all(tmp_path)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    overrides = ("--config.train.num_steps=100000", "--config.train.checkpoint_every=5",
                 "--config.train.log_every=1")
    proc = subprocess.Popen(main_command(tmp_path, *overrides), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "5").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM" in stderr
    steps = _restore_all(tmp_path)
    stopped_at = max(steps)
    assert stopped_at >= 5
    assert not (tmp_path / "result.json").exists()   # not finished: a rerun resumes
    resumed = run_main(tmp_path, "--config.train.num_steps=%d" % (stopped_at + 2),
                       "--config.train.checkpoint_every=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {stopped_at}" in resumed.stderr


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate without clipping overflows within a few steps.
    proc = run_main(tmp_path, "--config.optim.learning_rate=1e10",
                    "--config.optim.clip_norm=0", "--config.optim.warmup_steps=2",
                    "--config.train.num_steps=50", "--config.train.checkpoint_every=1",
                    "--config.train.log_every=1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not finite" in proc.stderr or "train/loss is nan" in proc.stderr or \
        "train/loss is inf" in proc.stderr, proc.stderr[-3000:]
    assert "last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr
    steps = _restore_all(tmp_path)
    assert steps, "no good checkpoint was kept"
    failed_at = int(re.search(r"not finite at step (\d+)|is nan at step (\d+)|is inf at step (\d+)",
                              proc.stderr).group(0).split()[-1])
    assert max(steps) < failed_at


@pytest.mark.parametrize("override, field", [
    ("--config.model.d_model=130", "config.model.d_model"),
    ("--config.model.attention.rope_fraction=0.03125", "config.model.attention.rope_fraction"),
    ("--config.model.attention.kind=nope_attention", "config.model.attention.kind"),
    ("--config.data.source=text_files", "config.data.text_glob"),
])
def test_bad_config_fails_before_compilation_naming_the_field(tmp_path, override, field):
    proc = run_main(tmp_path, override)
    assert proc.returncode == 1
    assert field in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
