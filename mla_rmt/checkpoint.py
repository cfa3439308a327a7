"""Orbax checkpoints of the train state together with the data iterator's position.

Saving both in one step directory is what makes a resumed run see exactly the batches an
uninterrupted run would have seen. The data position is saved per data shard
(data.ShardStateHandler), so a run may resume on another process count with the same
config.data.num_shards. Orbax writes each step to a temporary directory and renames it when
complete, so a process killed mid-save leaves no half-written step behind.
"""
import orbax.checkpoint as ocp
from etils import epath

from mla_rmt import data


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
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
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = data.iterator_save_args(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Returns the state at `step` (placed as `abstract_state` says); rewinds the iterator."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=data.iterator_restore_args(data_iterator))
        return self.manager.restore(step, args=args).state

    def restore_state(self, step: int, abstract_state):
        """The train state alone (for offline analysis, where no iterator exists)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
