"""The entry point's flag handling, in-process: a bad override is named, the sweep's trials are
listed, and a trial index outside the sweep or a missing workdir is refused before any training."""
import sys

import pytest
from absl import app, flags
from conftest import REPO

from mla_rmt import main, sweep
from configs import rope_budget_sweep

SWEEP = f"--config={REPO / 'configs/rope_budget_sweep.py'}:tiny"


@pytest.fixture
def parse(monkeypatch):
    """main's flag parser on the global flags, reset afterwards for the tests that follow
    (config_flags reads the overrides from sys.argv, as under app.run)."""
    def run(*args):
        monkeypatch.setattr(sys, "argv", ["main", *args])
        return main._parse_flags(sys.argv)  # pylint: disable=protected-access
    yield run
    flags.FLAGS.unparse_flags()


def test_a_misspelled_override_is_named(parse):
    with pytest.raises(SystemExit) as exit_info:
        parse(SWEEP, "--config.train.num_steps=3", "--config.model.attention.knid=mha")
    message = str(exit_info.value.code)
    assert "--config.model.attention.knid" in message and "--config.train.num_steps" not in message


def test_list_trials_prints_every_trial_of_the_sweep(parse, capsys):
    parse(SWEEP, "--list_trials")
    main.main(["main"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    declared = rope_budget_sweep.get_sweep("tiny")
    assert [(int(i), name) for i, name, _ in rows] == [
        (i, sweep.trial_name(o)) for i, o in enumerate(declared)]


@pytest.mark.parametrize("args, error", [(("--workdir=/nonexistent/w", "--trial=99"), "--trial=99"),
                                         ((), "--workdir")])
def test_a_bad_trial_or_no_workdir_is_refused_before_training(parse, args, error):
    parse(SWEEP, *args)
    with pytest.raises(app.UsageError, match=error):
        main.main(["main"])
