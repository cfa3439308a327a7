"""The entry point's flag handling, in-process: a bad override is a short error naming it, the
sweep's trials are listed, a trial index outside the sweep or a missing workdir is refused before
any training, and a trial with a bad config fails naming the field."""
import logging

import pytest
from absl import app
from conftest import FAST, REPO

from mla_rmt import main, sweep
from configs import rope_budget_sweep

SWEEP = f"--config={REPO / 'configs/rope_budget_sweep.py'}:tiny"
LLAMA = f"--config={REPO / 'configs/llama.py'}:tiny"


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


@pytest.mark.parametrize("args, error", [
    (("--workdir=/nonexistent/w", "--trial=99"), r"--trial=99: \[99\] not in the sweep's trials 0..9"),
    (("--workdir=/nonexistent/w", "--trial=1,x"), "--trial=1,x: 'x' is not a trial index"),
    ((), "--workdir")])
def test_a_bad_trial_or_no_workdir_is_refused_before_training(parse, args, error):
    parse(SWEEP, *args)
    with pytest.raises(app.UsageError, match=error):
        main.main(["main"])


@pytest.mark.parametrize("override, expected", [
    ("--config.model.d_modle=3", ('--config.model.d_modle', 'Did you mean "d_model"')),
    ("--config.train.num_steps=abc", ("--config.train.num_steps=abc", "invalid literal for int()")),
])
def test_a_bad_override_is_a_short_error(parse, override, expected):
    """sys.exit with a message: Python prints it to stderr with exit status 1, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        parse(LLAMA, override, "--workdir=unused")
    message = exit_info.value.code
    assert isinstance(message, str), message
    for text in expected:
        assert text in message, message
    assert "Traceback" not in message and len(message.strip().splitlines()) <= 3, message


def test_a_trial_with_a_bad_config_fails_naming_the_field(parse, tmp_path, caplog):
    parse(LLAMA, f"--workdir={tmp_path}", *FAST, "--config.model.d_model=130")
    with pytest.raises(SystemExit) as exit_info:
        main.main(["main"])
    assert exit_info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("config.model.d_model" in e for e in errors), errors
    assert not any(r.exc_info for r in caplog.records)     # reported without a traceback
    assert not (tmp_path / "checkpoints").exists()
