"""Two local processes through jax.distributed train like one, and their checkpoint resumes on one.

The processes are real `python -m mla_rmt.main` runs joined by `--coordinator_address` (CPU,
gloo collectives), each with one CPU device: a mesh of 2 devices over 2 processes. With
config.data.num_shards fixed, the global batches do not depend on the process count, so the
per-step losses must equal a one-process run of the same config to float precision.
(A checkpoint written on one mesh restoring on another within a process is
tests/test_sharding.py's test_checkpoint_written_on_one_mesh_restores_on_another.)
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, main_command, read_scalars, run_main

from mla_rmt import data, presets, tokenizer
from mla_rmt.preemption import PREEMPTED_EXIT_CODE
from mla_rmt.model_config import ConfigError

FIRST, TOTAL = 4, 8      # the two processes train FIRST steps; one process continues to TOTAL
# float32 compute so that the two runs differ only by the order of float reductions. All steps
# are inside the warmup, whose learning rate does not depend on num_steps: a run to FIRST steps
# extended to TOTAL sees the learning rates of a run to TOTAL steps.
COMMON = ("--config.data.num_shards=2", "--config.model.dtype=float32",
          "--config.optim.warmup_steps=50", "--config.train.log_every=1",
          "--config.train.eval_every=4", "--config.train.checkpoint_every=2")
TOLERANCE = dict(rtol=1e-6, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each process runs as if on a host of its own: a sitecustomize gives it its own hostname, which
# TensorBoard writers put in their file names (events.out.tfevents.<time>.<hostname>). On one
# machine two processes would otherwise name their files alike and could overwrite each other.
SITECUSTOMIZE = "import socket\nsocket.gethostname = lambda: {host!r}\n"


def _host(process: int) -> str:
    return f"mla-rmt-process-{process}"


def _start_two_processes(workdir, logdir, *overrides) -> tuple[list, list]:
    """Starts main as processes 0 and 1 of one job; returns the processes and their log files."""
    port = _free_port()
    procs, logs = [], [logdir / f"process_{i}.log" for i in range(2)]
    for i in range(2):
        site = logdir / f"site_{i}"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(host=_host(i)))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                            os.environ.get("PYTHONPATH")])))
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count"))
        with open(logs[i], "w", encoding="utf-8") as log:
            procs.append(subprocess.Popen(
                main_command(workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"),
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _wait_all(procs, logs, timeout=300, expected=0) -> list[str]:
    """Waits for the processes (killing any left at the end); returns their logs."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = [log.read_text() for log in logs]
    for i, (proc, text) in enumerate(zip(procs, texts)):
        assert proc.returncode == expected, f"process {i} exited {proc.returncode}:\n{text[-4000:]}"
    return texts


def _run_two_processes(workdir, logdir, *overrides, timeout=300) -> list[str]:
    """Runs main as processes 0 and 1 of one job; returns their logs (stdout and stderr)."""
    return _wait_all(*_start_two_processes(workdir, logdir, *overrides), timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """{'one': a one-process run to TOTAL steps, 'two': two processes to FIRST steps, logs}."""
    del data_cache
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    # The one-process run first: it builds the session's corpus and tokenizer cache, which the
    # two processes then share instead of both building it.
    proc = run_main(one, *COMMON, f"--config.train.num_steps={TOTAL}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = _run_two_processes(two, tmp_path_factory.mktemp("logs"), *COMMON,
                              f"--config.train.num_steps={FIRST}")
    return {"one": one, "two": two, "logs": logs}


def _event_counts(logdir) -> tuple[int, dict[str, list[int]]]:
    """(file_version records, tag -> every step logged, duplicates kept) over logdir's event files."""
    from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=import-outside-toplevel
    versions, steps = 0, {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            if event.HasField("file_version"):
                versions += 1
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return versions, steps


def test_the_two_processes_form_one_job(runs):
    for i, log in enumerate(runs["logs"]):
        assert f"Process {i} of 2; 1 local / 2 global devices" in log, log[-3000:]
        assert re.search(r"over 2 devices .*2 process\(es\)", log), log[-3000:]


def test_two_processes_lose_like_one(runs):
    one, two = read_scalars(runs["one"]), read_scalars(runs["two"])
    steps = list(range(1, FIRST + 1))
    assert sorted(two["train/loss"]) == steps
    np.testing.assert_allclose([two["train/loss"][s] for s in steps],
                               [one["train/loss"][s] for s in steps], **TOLERANCE)
    np.testing.assert_allclose(two["eval/loss"][FIRST], one["eval/loss"][FIRST], **TOLERANCE)
    assert two["train/loss"][FIRST] != two["train/loss"][1]      # it trained


def test_only_process_0_writes_summaries(runs):
    files = sorted(p.name for p in runs["two"].glob("events.out.tfevents.*"))
    assert not [f for f in files if _host(1) in f], files
    assert [f for f in files if _host(0) in f] == files
    assert len(files) == 2, files                     # the training summaries and the HParams
    versions, steps = _event_counts(runs["two"])      # each step logged once, no file garbled
    assert versions == len(files)
    assert steps["train/loss"] == list(range(1, FIRST + 1))
    assert steps["eval/loss"] == [FIRST]
    assert steps["_hparams_/session_start_info"] == [0]
    assert steps["final/eval_loss"] == [FIRST]


def _restore(checkpoints, step, like=None):
    """The train state saved at step; onto like's shapes and this process's first device."""
    import jax  # pylint: disable=import-outside-toplevel
    target = None if like is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        like)
    with ocp.CheckpointManager(checkpoints) as manager:
        assert step in manager.all_steps()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        return manager.restore(step, args=args).state


def test_the_checkpoint_of_two_processes_is_complete(runs):
    """Every array restores and equals the one-process state; both shards' data positions are there."""
    import jax  # pylint: disable=import-outside-toplevel
    two, one = runs["two"] / "checkpoints", runs["one"] / "checkpoints"
    want = _restore(one, FIRST)
    got = _restore(two, FIRST, like=want)     # saved on 2 processes: its devices are not ours
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(got_leaves) == len(want_leaves) > 10
    for path, leaf in got_leaves:
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(want_leaves[path]), rtol=1e-4,
                                   atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert int(got["step"]) == FIRST
    positions = sorted(p.name for p in (two / str(FIRST) / "data").glob("*.json"))
    assert positions == ["shard_0-of-2.json", "shard_1-of-2.json"]
    for name in positions:    # the same batches were read, so the same positions were saved
        assert json.loads((two / str(FIRST) / "data" / name).read_text()) == \
            json.loads((one / str(FIRST) / "data" / name).read_text())


def test_one_process_resumes_the_checkpoint_of_two(runs, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(runs["two"], workdir)
    (workdir / "result.json").unlink()      # finished at FIRST steps: extend it to TOTAL
    proc = run_main(workdir, *COMMON, f"--config.train.num_steps={TOTAL}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Resuming from the checkpoint at step {FIRST}" in proc.stderr
    assert "Process 0 of" not in proc.stderr            # one process: no jax.distributed
    resumed, reference = read_scalars(workdir)["train/loss"], read_scalars(runs["one"])["train/loss"]
    steps = list(range(1, TOTAL + 1))
    assert sorted(resumed) == steps
    np.testing.assert_allclose([resumed[s] for s in steps], [reference[s] for s in steps],
                               **TOLERANCE)
    assert json.loads((workdir / "result.json").read_text())["step"] == TOTAL


def test_data_position_is_per_shard_and_names_a_num_shards_mismatch(data_cache, tmp_path):
    """In one process: what processes 0 and 1 of 2 save restores into the 1-process iterator."""
    del data_cache
    config = presets.base_config()
    config.data.seq_len, config.data.global_batch_size, config.data.num_shards = 32, 8, 2
    tok = tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    handler, directory = data.ShardStateHandler(), tmp_path / "data"
    directory.mkdir()
    for process in range(2):
        it = data.make_train_iterator(config, tok, process, 2)
        for _ in range(3):
            next(it)
        handler.save(directory, data.ShardStateSave(it))
        it.close()
    reference = data.make_train_iterator(config, tok)
    for _ in range(3):
        next(reference)
    expected = [next(reference) for _ in range(2)]
    reference.close()

    resumed = handler.restore(directory, data.ShardStateRestore(data.make_train_iterator(config, tok)))
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])
    resumed.close()

    config.data.num_shards = 1
    other = data.make_train_iterator(config, tok)
    with pytest.raises(ConfigError, match=r"config\.data\.num_shards.*shard_0-of-1\.json"):
        handler.restore(directory, data.ShardStateRestore(other))
    other.close()


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs, tmp_path):
    """One process gets SIGTERM; the two agree on a step, both save it and exit preempted."""
    del runs                                  # its one-process run built the session's cache
    workdir, logdir = tmp_path / "run", tmp_path / "logs"
    logdir.mkdir()
    check_every = 3
    procs, logs = _start_two_processes(workdir, logdir, *COMMON, "--config.train.num_steps=100000",
                                       "--config.train.checkpoint_every=1000",
                                       f"--config.train.preemption_check_every={check_every}")
    try:
        deadline = time.time() + 300
        while "step 4/" not in logs[0].read_text():      # training, past the first check step
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text()[-3000:] for log in logs]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        texts = _wait_all(procs, logs, timeout=300, expected=PREEMPTED_EXIT_CODE)
    assert "SIGTERM received" in texts[1] and "Another process received SIGTERM" in texts[0]
    stopped = [int(re.search(r"Stopped at step (\d+) after SIGTERM", t).group(1)) for t in texts]
    assert stopped[0] == stopped[1] and stopped[0] % check_every == 0, stopped
    step = stopped[0]
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        assert list(manager.all_steps()) == [step]
    positions = sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("*.json"))
    assert positions == ["shard_0-of-2.json", "shard_1-of-2.json"]        # both processes saved
    assert sorted(read_scalars(workdir)["train/loss"]) == list(range(1, step + 1))
    assert not (workdir / "result.json").exists()
