"""Orbax checkpoints of the train state together with the data iterator's position.

Saving both in one step directory is what makes a resumed run see exactly the batches an
uninterrupted run would have seen. The data position is saved per data shard
(data.ShardStateHandler), so a run may resume on another process count with the same
config.data.num_shards. Orbax writes each step to a temporary directory and renames it when
complete, so a process killed mid-save leaves no half-written step behind. A step that is
there but does not restore (damaged storage) is skipped for the newest one that does, and
moved aside to `<step>.damaged` (kept for inspection; the run writes that step anew).
"""
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mla_rmt import data
from mla_rmt.model_config import ConfigError


class CheckpointError(RuntimeError):
    """No checkpoint of a directory restores, or a save failed; names the directory."""


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
        self._last_step = None     # of the latest save started, named if it fails
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
        """Starts an async save of step; first raises the error of a previous save if one failed."""
        self.check_for_errors()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = data.iterator_save_args(data_iterator)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(e, f"step {step} or the save before it") from e
        self._last_step = step
        return started

    def _save_failed(self, error: Exception, which: str) -> "CheckpointError":
        return CheckpointError(f"saving {which} in {self.directory} failed: "
                               f"{type(error).__name__}: {error}")

    def restore(self, step: int, abstract_state, data_iterator):
        """Returns the state at `step` (placed as `abstract_state` says); rewinds the iterator."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=data.iterator_restore_args(data_iterator))
        return self.manager.restore(step, args=args).state

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) of the newest checkpoint that restores, (None, None) when there is none.

        A step that fails to restore is logged with its directory and the one before it is
        tried; a config error (e.g. another config.data.num_shards) is not the checkpoint's
        fault and is raised at once.
        """
        failures, damaged = [], []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iterator)
                self._move_aside(damaged)
                return state, step
            except ConfigError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                logging.warning("Checkpoint %s does not restore (%s: %s); trying the one before it.",
                                self.directory / str(step), type(e).__name__, first_line)
                failures.append(f"{self.directory / str(step)}: {type(e).__name__}: {first_line}")
                damaged.append(step)
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} restores:\n  " +
                                  "\n  ".join(failures) + "\nMove the damaged step directories "
                                  "away to resume from an older one, or the whole directory to "
                                  "start afresh.")
        return None, None

    def _move_aside(self, steps: list[int]) -> None:
        """Renames damaged steps out of the manager's view, so the run can save them again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.damaged"
                n = 1
                while target.exists():
                    target, n = self.directory / f"{step}.damaged{n}", n + 1
                (self.directory / str(step)).rename(target)
                logging.warning("Moved the damaged checkpoint %s aside to %s", self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            multihost_utils.sync_global_devices("checkpoint: damaged steps moved aside")
        self.manager.reload()

    def check_for_errors(self) -> None:
        """Raises, naming the directory, if an async save that has completed failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(e, f"step {self._last_step}") from e

    def restore_state(self, step: int, abstract_state):
        """The train state alone (for offline analysis, where no iterator exists)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

    def close(self) -> None:
        """Waits for the saves in flight (raising if one failed), then closes the manager."""
        try:
            try:
                self.manager.wait_until_finished()
            except Exception as e:  # pylint: disable=broad-except
                raise self._save_failed(e, f"step {self._last_step}") from e
            self.check_for_errors()
        finally:
            self.manager.close()
