"""Entry point: `python -m mla_rmt.main --config=configs/<file>.py[:arg] --workdir=DIR`.

Fields are overridden with `--config.a.b=value` (for every trial). A config file that
declares a sweep (`get_sweep`) runs each trial in turn in DIR/<swept values>/, or one with
`--trial=N`; finished trials are skipped and unfinished ones resume from their checkpoint.
"""
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mla_rmt import distributed, hparams, sweep, train
from mla_rmt.model_config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard files.")
_TRIAL = flags.DEFINE_integer("trial", None, "Run only this trial of the sweep (0-based).")
_LIST = flags.DEFINE_bool("list_trials", False, "Print the sweep's trials and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 "
                                   "(multi-process runs without SLURM or a TPU slice).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With --coordinator_address.")
flags.mark_flags_as_required(["config"])

# Errors that end a trial with a message rather than a traceback.
TRIAL_ERRORS = (ConfigError, FloatingPointError, FileNotFoundError, KeyError, ValueError)


def trials() -> list[tuple[str | None, dict]]:
    """(subdirectory, overrides) for each trial; a config without a sweep is one trial in DIR."""
    declared = sweep.load(config_flags.get_config_filename(flags.FLAGS["config"]))
    if declared is None:
        return [(None, {})]
    return [(sweep.trial_name(overrides), overrides) for overrides in declared]


def run_trial(workdir: str, overrides: dict) -> str:
    """Runs one trial to the end; returns 'finished', 'skipped', 'preempted' or 'failed'."""
    if (epath.Path(workdir) / "result.json").exists():
        logging.info("Trial %s already finished: skipping.", workdir)
        return "skipped"
    config = sweep.apply(_CONFIG.value, overrides)
    logging.info("Trial %s %s", workdir, overrides)
    try:
        result = train.train_and_evaluate(config, workdir)
    except TRIAL_ERRORS as e:
        logging.error("Trial %s failed: %s: %s", workdir, type(e).__name__, e)
        return "failed"
    if result.status == "finished":
        hparams.write(workdir, config, overrides, result.metrics, result.step)
    return result.status


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
    selected = list(enumerate(all_trials))
    if _TRIAL.value is not None:
        if not 0 <= _TRIAL.value < len(all_trials):
            raise app.UsageError(f"--trial={_TRIAL.value}: the sweep has {len(all_trials)} trials "
                                 f"(0..{len(all_trials) - 1}).")
        selected = [selected[_TRIAL.value]]

    statuses = {}
    for i, (name, overrides) in selected:
        workdir = str(epath.Path(_WORKDIR.value) / name) if name else _WORKDIR.value
        statuses[name or workdir] = status = run_trial(workdir, overrides)
        if status == "preempted":
            break                      # SIGTERM: stop here; a rerun resumes this trial
    if len(selected) > 1:
        logging.info("Sweep summary:\n%s", "\n".join(f"  {s:9s} {n}" for n, s in statuses.items()))
    failed = [n for n, s in statuses.items() if s == "failed"]
    if failed:
        logging.error("%d trial(s) failed: %s", len(failed), ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
