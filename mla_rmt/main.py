"""Entry point: `python -m mla_rmt.main --config=configs/<file>.py[:arg] --workdir=DIR`.

Fields are overridden with `--config.a.b=value` (for every trial). A config file that
declares a sweep (`get_sweep`) runs each trial in turn in DIR/<swept values>/, or some with
`--trial` (`3`, `0-5`, `0,4,8-9`); finished trials are skipped and unfinished ones resume from
their checkpoint.

A failing trial is reported and the next one runs; the exit status is 1 when any failed.
After SIGTERM the running trial saves and the process exits with PREEMPTED_EXIT_CODE (75,
EX_TEMPFAIL: run the same command again to resume). Ctrl-C stops the trial before its next step
(a second Ctrl-C at once) and the sweep with it, with a non-zero exit status.
"""
import logging as py_logging
import signal
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mla_rmt import checkpoint, distributed, hparams, sweep, train, workdir as workdir_lib
from mla_rmt.preemption import PREEMPTED_EXIT_CODE
from mla_rmt.model_config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard files.")
_TRIAL = flags.DEFINE_string("trial", "", "Run only these trials of the sweep (0-based): '3', "
                             "'0-5', '0,4,8-9'.")
_LIST = flags.DEFINE_bool("list_trials", False, "Print the sweep's trials and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 "
                                   "(multi-process runs without SLURM or a TPU slice).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With --coordinator_address.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose recorded config differs in fields that "
    "define the run (model, data, optim, seed); the change is logged and appended to the "
    "workdir's config_history.jsonl.")
flags.mark_flags_as_required(["config"])

# Errors that end a trial with a message rather than a traceback; any other exception ends it
# with its traceback. Either way the next trial runs.
TRIAL_ERRORS = (ConfigError, FloatingPointError, FileNotFoundError, KeyError, ValueError,
                workdir_lib.WorkdirError, checkpoint.CheckpointError)


class _Interrupt:
    """Remembers Ctrl-C, so the sweep stops even if a library turned the KeyboardInterrupt into
    another exception (which run_trial would take for a failed trial)."""

    received = False

    @classmethod
    def handle(cls, signum, frame):
        cls.received = True
        signal.default_int_handler(signum, frame)


def trials() -> list[tuple[str | None, dict]]:
    """(subdirectory, overrides) for each trial; a config without a sweep is one trial in DIR."""
    declared = sweep.load(config_flags.get_config_filename(flags.FLAGS["config"]))
    if declared is None:
        return [(None, {})]
    return [(sweep.trial_name(overrides), overrides) for overrides in declared]


def run_trial(workdir: str, overrides: dict) -> str:
    """Runs one trial to the end; returns 'finished', 'skipped', 'preempted' or 'failed'.

    Every failure is contained here (KeyboardInterrupt and SystemExit are not failures).
    """
    if workdir_lib.finished(epath.Path(workdir)):
        logging.info("Trial %s already finished: skipping.", workdir)
        return "skipped"
    config, error = None, None
    try:
        config = sweep.apply(_CONFIG.value, overrides)
        logging.info("Trial %s %s", workdir, overrides)
        return train.train_and_evaluate(config, workdir, overrides, _ALLOW_CHANGE.value).status
    except TRIAL_ERRORS as e:
        error = e
        logging.error("Trial %s failed: %s: %s", workdir, type(e).__name__, e)
    except Exception as e:  # pylint: disable=broad-except
        error = e
        logging.exception("Trial %s failed: %s: %s", workdir, type(e).__name__, e)
    # The HParams row says so, unless the workdir belongs to another job or config.
    if config is not None and not isinstance(error, workdir_lib.WorkdirError):
        try:
            hparams.write(workdir, config, overrides, {}, 0, "failed")
        except Exception:  # pylint: disable=broad-except
            logging.exception("Could not record the failure of %s in its HParams entry", workdir)
    return "failed"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    all_trials = trials()
    if _LIST.value:
        for i, (name, overrides) in enumerate(all_trials):
            print(f"{i}\t{name or '.'}\t{overrides}")
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        selected = [all_trials[i] for i in sweep.select(_TRIAL.value, len(all_trials))]
    except ValueError as e:
        raise app.UsageError(f"--trial={_TRIAL.value}: {e}") from None

    signal.signal(signal.SIGINT, _Interrupt.handle)
    statuses = {}
    for name, overrides in selected:
        workdir = str(epath.Path(_WORKDIR.value) / name) if name else _WORKDIR.value
        statuses[name or workdir] = status = run_trial(workdir, overrides)
        if _Interrupt.received:
            raise KeyboardInterrupt(f"interrupted during trial {workdir}")
        if status == "preempted":
            break                      # SIGTERM: stop here; a rerun resumes this trial
    if len(selected) > 1:
        logging.info("Sweep summary:\n%s", "\n".join(f"  {s:9s} {n}" for n, s in statuses.items()))
    failed = [n for n, s in statuses.items() if s == "failed"]
    if failed:
        logging.error("%d trial(s) failed: %s", len(failed), ", ".join(failed))
    if "preempted" in statuses.values():
        sys.exit(PREEMPTED_EXIT_CODE)
    if failed:
        sys.exit(1)


class _QuietOrbax(py_logging.Filter):
    """Keeps orbax's per-checkpoint INFO lines out of the log; its warnings and errors stay."""

    def filter(self, record):
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv):
    """absl's flag parsing, with a short message for a bad --config.a.b override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:                    # absl's own message
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").replace("'", "").split())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if o.rsplit(".", 1)[-1] in text] or overrides
        sys.exit(f"FATAL Flags parsing error: {', '.join(named)}: {text}")


if __name__ == "__main__":
    logging.get_absl_handler().addFilter(_QuietOrbax())
    app.run(main, flags_parser=_parse_flags)
