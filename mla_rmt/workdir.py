"""What a trial's workdir records about its run, and the lock that keeps one job in it.

`config.json` is the config the checkpoints in the workdir were trained with. A later start on
the same workdir compares the fields that define the run (model, data, optimiser, seed; not
cadences, num_steps, logging or the mesh) and refuses a difference, naming the fields, unless
it is explicitly allowed. `config_history.jsonl` gets one line per start: the step it started
from, the fields that changed, and the whole config.

`.lock` is held (flock) by the process that trains in the workdir. The kernel drops it when
that process dies, so the lock of a killed run is taken over by the next start, which says so.
Only file systems with flock are locked; an object-store workdir (gs://) is not, with a warning.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterator

import ml_collections
import numpy as np
from absl import logging
from etils import epath


CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
RESULT_FILE = "result.json"

# The config groups that define what a run trains; everything else (train, diagnostics, mesh)
# may change between a run and its resume.
RUN_GROUPS = ("seed", "model", "data", "optim")
# Fields inside those groups that change how, not what, is computed or where it is read from.
NOT_RUN_FIELDS = frozenset({"model.remat", "model.scan_unroll", "model.attention_impl",
                            "data.data_dir", "data.worker_count"})


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked (busy, changed config, unwritable)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def run_fields(config: dict) -> dict[str, Any]:
    """The dotted fields of a config (as a dict) that define the run."""
    flat = _flatten({k: config[k] for k in RUN_GROUPS if k in config})
    return {k: v for k, v in flat.items() if k not in NOT_RUN_FIELDS}


def differences(recorded: dict, config: dict) -> dict[str, tuple[Any, Any]]:
    """field -> (recorded value, new value) for every run-defining field that differs."""
    old, new = run_fields(recorded), run_fields(config)
    missing = "<absent>"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def _as_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def read_record(workdir: epath.Path) -> dict | None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise WorkdirError(f"{path}: the workdir's config record does not read ({e}); restore or "
                           "remove it to start this workdir afresh") from e


def check_config(workdir: epath.Path, config: ml_collections.ConfigDict,
                 allow_change: bool) -> dict[str, tuple[Any, Any]]:
    """The run-defining fields that differ from the workdir's record; raises unless allowed."""
    recorded = read_record(workdir)
    if recorded is None:
        return {}
    changed = differences(recorded, _as_dict(config))
    if not changed:
        return {}
    lines = "\n".join(f"  config.{k}: {old!r} in the record, {new!r} now" for k, (old, new) in changed.items())
    if not allow_change:
        raise WorkdirError(
            f"{workdir} was trained with another config; {len(changed)} field(s) that define the "
            f"run differ:\n{lines}\nUse another --workdir, or resume with --allow_config_change to "
            f"continue this run under the new config (recorded in {workdir / HISTORY_FILE}).")
    logging.warning("Resuming %s under a changed config (--allow_config_change):\n%s", workdir, lines)
    return changed


def record_config(workdir: epath.Path, config: ml_collections.ConfigDict, step: int,
                  changed: dict[str, tuple[Any, Any]]) -> None:
    """Writes config.json and appends this start to config_history.jsonl."""
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1))
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "start_step": step, "changed": {k: list(v) for k, v in changed.items()},
             "config": _as_dict(config)}
    with (workdir / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def finished(workdir: epath.Path) -> bool:
    """A trial is finished when result.json exists and the checkpoint of its step is committed
    (the result is written before the final checkpoint: a kill between them resumes the trial)."""
    path = workdir / RESULT_FILE
    if not path.exists():
        return False
    try:
        step = json.loads(path.read_text())["step"]
    except (ValueError, KeyError, OSError):
        return False
    return (workdir / "checkpoints" / str(step)).is_dir()


class Lock:
    """An exclusive flock on workdir/.lock, with the holder's host and pid written in it."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_FILE
        self._fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirError(f"{self.path.parent} is in use by {holder} (it holds {self.path}); "
                               "wait for it to end or use another --workdir") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:   # written by a holder that never released it: it died
            logging.warning("Taking over the lock of %s, a process that is no longer running.", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)     # the file stays: unlinking it would race a new holder
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _is_local(workdir: epath.Path) -> bool:
    return "://" not in os.fspath(workdir)


def _check_writable(workdir: epath.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot write there ({type(e).__name__}: {e})") from e


def _agree(error: Exception | None) -> None:
    """Raises on every process when process 0 (which alone checks the workdir) failed."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is None and int(failed):
            raise WorkdirError("process 0 could not open the workdir; its log says why")
    if error is not None:
        raise error


@contextlib.contextmanager
def claim(workdir: epath.Path, config: ml_collections.ConfigDict,
          allow_change: bool) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Holds the workdir for this run; yields the allowed config changes.

    Process 0 takes the lock and compares the config; every process learns whether it may go on.
    """
    import jax  # pylint: disable=import-outside-toplevel
    lock, error, changed = None, None, {}
    if jax.process_index() == 0:
        try:
            _check_writable(workdir)
            if _is_local(workdir):
                lock = Lock(workdir)
                lock.acquire()
            else:
                logging.warning("%s is not a local path: no lock keeps a second job out of it.", workdir)
            changed = check_config(workdir, config, allow_change)
        except Exception as e:  # pylint: disable=broad-except  (every process must hear of it)
            error = e
            if lock is not None:
                lock.release()
    _agree(error)
    try:
        yield changed
    finally:
        if lock is not None:
            lock.release()
