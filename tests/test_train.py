"""The trainer end to end through `mla_rmt.main`: resume, preemption, NaN, summaries; a process
of its own where the test is about the process (a kill, a signal, its log, its file limits)."""
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FAST_OVERRIDES, REPO, main_command, read_scalars, run_main
from kill_during_save import POINTS
from test_sweep import hparams_data

from mla_rmt import main
from mla_rmt.preemption import PREEMPTED_EXIT_CODE

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


def _main(parse, caplog, workdir, *overrides):
    """mla_rmt.main in this process on a FAST trial: its exit status and its log."""
    parse(*main_command(workdir, *overrides)[3:])
    caplog.clear()
    caplog.set_level(logging.INFO, logger="absl")      # parsed flags leave absl at WARNING
    try:
        main.main(["main"])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, "\n".join(r.getMessage() for r in caplog.records)


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
    # orbax's INFO lines (dozens per checkpoint) stay out of the user's log
    assert "checkpoint_manager.py" not in proc.stderr and "[process=0]" not in proc.stderr


def test_sigkill_then_resume_reproduces_losses(uninterrupted, tmp_path, parse, caplog):
    reference = read_scalars(uninterrupted[0])["train/loss"]
    proc = subprocess.Popen(main_command(tmp_path, *COMMON), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "20").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept_after_kill = _restore_all(tmp_path)
    assert 20 in kept_after_kill and STEPS not in kept_after_kill

    status, log = _main(parse, caplog, tmp_path, *COMMON)
    assert status == 0, log[-3000:]
    assert "Resuming from the checkpoint at step" in log
    assert f'Taking over the lock of {{"host": "{os.uname().nodename}", "pid": {proc.pid}}}' in log
    losses = read_scalars(tmp_path)["train/loss"]
    assert sorted(losses) == sorted(reference)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference[s] for s in sorted(reference)], rtol=0, atol=1e-6)
    assert STEPS in _restore_all(tmp_path)


def test_a_second_job_is_refused_and_sigterm_saves_and_exits_preempted(tmp_path, parse, caplog):
    overrides = ("--config.train.num_steps=100000", "--config.train.checkpoint_every=5",
                 "--config.train.log_every=1")
    proc = subprocess.Popen(main_command(tmp_path, *overrides), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "5").exists(), proc)
    status, log = _main(parse, caplog, tmp_path, *overrides, "--config.seed=1")
    assert status == 1, log[-3000:]
    assert f"{tmp_path} is in use by {{\"host\"" in log and f'"pid": {proc.pid}' in log
    assert not any(r.exc_info for r in caplog.records) and "Model:" not in log
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "SIGTERM" in stderr
    steps = _restore_all(tmp_path)
    stopped_at = max(steps)
    assert stopped_at >= 5
    assert not (tmp_path / "result.json").exists()   # not finished: a rerun resumes
    assert sorted(read_scalars(tmp_path)["train/loss"]) == list(range(1, stopped_at + 1))
    start = hparams_data(tmp_path)["_hparams_/session_start_info"][0].session_start_info
    assert start.hparams["status"].string_value == "preempted"
    assert hparams_data(tmp_path)["_hparams_/session_end_info"][0].session_end_info.status == 3  # RUNNING
    status, log = _main(parse, caplog, tmp_path, f"--config.train.num_steps={stopped_at + 2}",
                        "--config.train.checkpoint_every=5")
    assert status == 0, log[-3000:]
    assert f"Resuming from the checkpoint at step {stopped_at}" in log


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(parse, tmp_path, caplog):
    # An absurd learning rate without clipping overflows within a few steps.
    status, log = _main(parse, caplog, tmp_path, "--config.optim.learning_rate=1e10",
                        "--config.optim.clip_norm=0", "--config.optim.warmup_steps=2",
                        "--config.train.num_steps=50", "--config.train.checkpoint_every=1",
                        "--config.train.log_every=1")
    assert status == 1
    assert "not finite" in log or "train/loss is nan" in log or "train/loss is inf" in log, log[-3000:]
    assert "last good checkpoint" in log
    assert not any(r.exc_info for r in caplog.records)     # reported without a traceback
    steps = _restore_all(tmp_path)
    assert steps, "no good checkpoint was kept"
    failed_at = int(re.search(r"not finite at step (\d+)|is nan at step (\d+)|is inf at step (\d+)",
                              log).group(0).split()[-1])
    assert max(steps) < failed_at


@pytest.mark.parametrize("override, field", [
    ({"model.d_model": 130}, "config.model.d_model"),
    ({"model.attention.rope_fraction": 0.03125}, "config.model.attention.rope_fraction"),
    ({"model.attention.kind": "nope_attention"}, "config.model.attention.kind"),
    ({"data.source": "text_files"}, "config.data.text_glob"),
])
def test_bad_config_fails_before_compilation_naming_the_field(tmp_path, override, field):
    from mla_rmt import presets, sweep, train  # pylint: disable=import-outside-toplevel
    from mla_rmt.model_config import ConfigError  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match=re.escape(field)):
        train.train_and_evaluate(sweep.apply(presets.base_config(), override), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def _copy_unfinished(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    (workdir / "result.json").unlink()        # as if killed just before the end
    return workdir


def test_resuming_under_another_run_config_is_refused_unless_allowed(uninterrupted, tmp_path, parse, caplog):
    workdir = _copy_unfinished(uninterrupted, tmp_path)
    record = (workdir / "config.json").read_text()
    changes = ("--config.model.attention.rope_fraction=0.5", "--config.model.attention.remove_gap=True")
    status, log = _main(parse, caplog, workdir, *COMMON, *changes)
    assert status == 1, log[-3000:]
    assert "config.model.attention.rope_fraction: 1.0 in the record, 0.5 now" in log
    assert "config.model.attention.remove_gap: False in the record, True now" in log
    assert str(workdir) in log and not any(r.exc_info for r in caplog.records)
    assert (workdir / "config.json").read_text() == record and not (workdir / "result.json").exists()

    status, log = _main(parse, caplog, workdir, *COMMON, *changes, "--allow_config_change")
    assert status == 0, log[-3000:]
    assert "under a changed config (--allow_config_change)" in log
    last = json.loads((workdir / "config_history.jsonl").read_text().splitlines()[-1])
    assert last["start_step"] == STEPS
    assert last["changed"] == {"model.attention.remove_gap": [False, True],
                               "model.attention.rope_fraction": [1.0, 0.5]}
    assert json.loads((workdir / "config.json").read_text())["model"]["attention"]["rope_fraction"] == 0.5
    # resumed at its last step: the result is the final evaluation, not an empty record
    result = json.loads((workdir / "result.json").read_text())
    assert result["step"] == STEPS and math.isfinite(result["eval/loss"])


def _damage(step_dir):
    """Truncates the array files of a checkpoint step, as a failed disk would leave them."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(100)


def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before(uninterrupted, tmp_path, parse, caplog):
    reference = read_scalars(uninterrupted[0])["train/loss"]
    workdir = _copy_unfinished(uninterrupted, tmp_path)
    _damage(workdir / "checkpoints" / str(STEPS))
    status, log = _main(parse, caplog, workdir, *COMMON)
    assert status == 0, log[-3000:]
    assert f"Checkpoint {workdir / 'checkpoints' / str(STEPS)} does not restore" in log
    assert "Resuming from the checkpoint at step 30" in log
    assert (workdir / "checkpoints" / f"{STEPS}.damaged").is_dir()      # kept, moved aside
    losses = read_scalars(workdir)["train/loss"]
    np.testing.assert_allclose([losses[s] for s in range(31, STEPS + 1)],
                               [reference[s] for s in range(31, STEPS + 1)], rtol=0, atol=1e-6)
    assert STEPS in _restore_all(workdir)


def test_when_no_checkpoint_restores_the_error_names_the_directory(uninterrupted, tmp_path, parse, caplog):
    workdir = _copy_unfinished(uninterrupted, tmp_path)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        _damage(workdir / "checkpoints" / str(step))
    status, log = _main(parse, caplog, workdir, *COMMON)
    assert status == 1, log[-3000:]
    assert f"no checkpoint in {workdir / 'checkpoints'} restores" in log
    for step in steps:
        assert f"{workdir / 'checkpoints' / str(step)}: " in log
        assert (workdir / "checkpoints" / str(step)).is_dir()          # nothing moved or lost


KILL_STEPS = 4
KILL_COMMON = (f"--config.train.num_steps={KILL_STEPS}", "--config.train.log_every=1",
               "--config.train.eval_every=2", "--config.train.checkpoint_every=2")


@pytest.mark.parametrize("point, step", [(p, KILL_STEPS) for p in POINTS] + [("in_flight", 2)])
def test_a_kill_during_a_checkpoint_keeps_every_scalar_logged_before_it(tmp_path, point, step, parse, caplog):
    command = [sys.executable, str(REPO / "tests" / "kill_during_save.py"), point, str(step),
               *main_command(tmp_path, *KILL_COMMON)[3:]]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    scalars = read_scalars(tmp_path)
    assert sorted(scalars["train/loss"]) == list(range(1, step + 1))
    assert sorted(scalars["eval/loss"]) == list(range(2, step + 1, 2))
    if step < KILL_STEPS:
        return
    # The final record precedes the final checkpoint.
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == KILL_STEPS
    assert result["eval/loss"] == pytest.approx(scalars["eval/loss"][KILL_STEPS], rel=1e-6)
    assert scalars["final/eval_loss"][KILL_STEPS] == pytest.approx(result["eval/loss"], rel=1e-6)
    if point != "before_commit":
        return
    status, log = _main(parse, caplog, tmp_path, *KILL_COMMON)      # not taken for finished: it resumes
    assert status == 0, log[-3000:]
    assert "Resuming from the checkpoint at step 2" in log
    assert KILL_STEPS in _restore_all(tmp_path)
    assert len(hparams_data(tmp_path)["_hparams_/session_start_info"]) == 1   # one HParams row


def test_a_batch_not_divisible_by_the_devices_names_the_field_before_compiling(tmp_path):
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run(main_command(tmp_path, "--config.data.global_batch_size=7"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "config.data.global_batch_size: 7 rows do not split over the 2 devices" in proc.stderr
    assert "First step" not in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_ctrl_c_stops_the_run_with_a_failure_status(tmp_path):
    proc = subprocess.Popen(main_command(tmp_path, "--config.train.num_steps=100000",
                                         "--config.train.log_every=1"),
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    _wait_for(lambda: (tmp_path / "config.json").exists(), proc)    # about to train
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)          # faulthandler prints where every thread is
        raise AssertionError("still running after Ctrl-C:\n" + proc.communicate()[1][-6000:]) from None
    assert proc.returncode not in (0, PREEMPTED_EXIT_CODE), stderr[-3000:]
    assert "Ctrl-C: stopping before the next step" in stderr
    assert "KeyboardInterrupt: Ctrl-C during training" in stderr
    assert not (tmp_path / "result.json").exists()


def _file_size_limit(limit_bytes):
    """A child whose writes past limit_bytes fail with EFBIG, as on a full disk (Python ignores
    SIGXFSZ, so the write raises rather than killing the process)."""
    import resource  # pylint: disable=import-outside-toplevel
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def test_a_failed_checkpoint_write_is_reported_naming_the_step_and_directory(tmp_path, data_cache):
    from mla_rmt import presets, sweep, tokenizer  # pylint: disable=import-outside-toplevel
    config = sweep.apply(presets.base_config(), {"data.seq_len": 32})
    tokenizer.get_tokenizer(config.data, config.model.vocab_size)   # the cache, built unlimited
    assert (data_cache / "tokenizers").is_dir()
    proc = subprocess.Popen(main_command(tmp_path, "--config.train.num_steps=6", "--config.train.log_every=1",
                                         "--config.train.checkpoint_every=2", "--config.train.eval_every=6"),
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=_file_size_limit(1 << 20))   # arrays of the tiny state exceed 1 MiB
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]
    # named at the first check after the write failed: a log step, or the next save at the latest
    assert re.search(r"saving step (2|4 or the save before it) in " + re.escape(str(tmp_path / "checkpoints"))
                     + " failed", stderr), stderr[-3000:]
    assert "File too large" in stderr
    assert "step 5/" not in stderr                    # reported before the next save's step
    assert not (tmp_path / "checkpoints" / "2").exists()


# The loop's pieces, in process ----------------------------------------------------------------

def test_every_is_the_one_cadence():
    from mla_rmt.train import every  # pylint: disable=import-outside-toplevel
    assert [s for s in range(1, 10) if every(3, s)] == [3, 6, 9]
    assert not any(every(0, s) for s in range(1, 10))


def test_the_reporter_fetches_one_step_late_and_everything_before_a_checkpoint(tmp_path):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from mla_rmt import checkpoint, config_check, presets, summaries  # pylint: disable=import-outside-toplevel
    from mla_rmt.train import MetricsReporter  # pylint: disable=import-outside-toplevel
    config = presets.base_config()
    config.train.peak_flops_per_device = 1e12
    writer = summaries.SummaryWriter(str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    reporter = MetricsReporter(config, config_check.validate(config), writer, ckpt, str(tmp_path))

    def metrics(loss):
        return {"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(1.0),
                "train/learning_rate": jnp.float32(1e-3), "spectra": {"not": "a scalar"}}

    for step in (1, 2, 3):
        reporter.add(step, metrics(10.0 - step))
    reporter.flush(3)                        # the newest step is still running: left pending
    assert [s for s, _ in reporter.pending] == [3] and reporter.last["train/loss"] == 8.0
    clock = time.perf_counter()
    reporter.start_clock(2)                  # the run's mean counts steps 3 and 4 from here
    reporter.add(4, metrics(6.0))
    reporter.flush(4, wait=True)             # before a checkpoint: everything
    elapsed = time.perf_counter() - clock
    assert not reporter.pending and reporter.last["train/loss"] == 6.0
    assert reporter.tokens_per_sec > 0
    assert reporter.run_tokens_per_sec >= 2 * reporter.tokens_per_step / elapsed
    reporter.add(5, metrics(float("nan")))
    with pytest.raises(FloatingPointError, match="train/loss is nan at step 5"):
        reporter.flush(5, wait=True)
    ckpt.close()
    writer.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0}
    assert set(scalars["perf/mfu"]) == {4} and "spectra" not in str(sorted(scalars))


def test_a_trial_in_process_writes_probes_and_spectra_and_logs_the_headline(tmp_path, caplog):
    from mla_rmt import presets, sweep, train  # pylint: disable=import-outside-toplevel
    config = sweep.apply(presets.base_config(), FAST_OVERRIDES)
    t = config.train
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 4, 1, 4, 4
    config.diagnostics.every, config.diagnostics.activations_every = 2, 3
    caplog.set_level(logging.INFO, logger="absl")   # parsed flags leave absl at WARNING
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result.status == "finished" and result.step == 4
    scalars = read_scalars(tmp_path)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    assert sorted(scalars["spectral/qk_circuit_sum/mp_gap/mean"]) == [0, 2]   # of the params after 0, 2
    assert sorted(scalars["activations/attn_sigma1/layer_00"]) == [3]
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["eval/loss"] == result.metrics["eval/loss"] and "spectral/qk_circuit/mp_gap/head_mean/mean" in on_disk
    finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trial finished")]
    assert len(finished) == 1, [r.getMessage() for r in caplog.records][-5:]
    assert str(tmp_path / "result.json") in finished[0] and "spectral/" not in finished[0]
    assert f"eval loss {result.metrics['eval/loss']:.4f}" in finished[0] and "tok/s" in finished[0]
