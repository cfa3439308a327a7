"""Runs `mla_rmt.main` and SIGKILLs itself at one point of the save of one checkpoint step.

    python tests/kill_during_save.py POINT STEP --config=... --workdir=... [flags]

POINT: `save_called` (the trainer asks for the save), `in_flight` (the async save started),
`before_commit` (the step is written, not yet renamed into place), `committed` (just after).
"""
import os
import signal
import sys

from absl import app
from orbax.checkpoint._src.path import atomicity

from mla_rmt import checkpoint

POINTS = ("save_called", "in_flight", "before_commit", "committed")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, step: int) -> None:
    save = checkpoint.Checkpointer.save
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    def killing_save(self, at, *args, **kwargs):
        if at == step and point == "save_called":
            _die()
        started = save(self, at, *args, **kwargs)
        if at == step and point == "in_flight":
            _die()
        return started

    async def killing_finalize(self, *args, **kwargs):
        target = self._final_path.name == str(step)   # pylint: disable=protected-access
        if target and point == "before_commit":
            _die()
        await finalize(self, *args, **kwargs)
        if target and point == "committed":
            _die()

    checkpoint.Checkpointer.save = killing_save
    atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


if __name__ == "__main__":
    assert sys.argv[1] in POINTS, sys.argv[1]
    _install(sys.argv[1], int(sys.argv[2]))
    from mla_rmt import main   # pylint: disable=import-outside-toplevel  (its flags: only here)
    app.run(main.main, argv=[sys.argv[0], *sys.argv[3:]], flags_parser=main._parse_flags)  # pylint: disable=protected-access
