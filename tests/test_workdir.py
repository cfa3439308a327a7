"""The workdir's config record and lock, in-process and against a real second process."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from etils import epath

from mla_rmt import presets, workdir
from mla_rmt.workdir import WorkdirError


def _config(**changes):
    config = presets.base_config()
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def test_run_fields_cover_model_data_optim_seed_but_not_cadences():
    fields = workdir.run_fields(json.loads(_config().to_json()))
    assert {"seed", "model.attention.rope_fraction", "data.seq_len", "data.global_batch_size",
            "optim.learning_rate"} <= set(fields)
    assert not [f for f in fields if f.startswith(("train.", "diagnostics.", "mesh."))]
    assert "model.remat" not in fields and "data.worker_count" not in fields


def test_a_changed_run_is_refused_naming_every_differing_field(tmp_path):
    path = epath.Path(tmp_path)
    workdir.record_config(path, _config(), 0, {})
    same_run = _config(**{"train.num_steps": 5, "train.log_every": 1, "diagnostics.every": 7,
                          "train.checkpoint_every": 3, "model.remat": True})
    assert workdir.check_config(path, same_run, allow_change=False) == {}
    changed = _config(**{"model.attention.rope_fraction": 0.5, "model.attention.remove_gap": True,
                         "data.seq_len": 64, "seed": 3, "train.num_steps": 5})
    with pytest.raises(WorkdirError) as error:
        workdir.check_config(path, changed, allow_change=False)
    message = str(error.value)
    for field, old, new in [("model.attention.rope_fraction", "1.0", "0.5"),
                            ("model.attention.remove_gap", "False", "True"),
                            ("data.seq_len", "128", "64"), ("seed", "0", "3")]:
        assert f"config.{field}: {old} in the record, {new} now" in message
    assert "num_steps" not in message and str(tmp_path) in message and "--allow_config_change" in message


def test_an_allowed_change_is_recorded_in_the_history(tmp_path):
    path = epath.Path(tmp_path)
    workdir.record_config(path, _config(), 0, {})
    changed = _config(**{"optim.learning_rate": 1e-4})
    diff = workdir.check_config(path, changed, allow_change=True)
    assert diff == {"optim.learning_rate": (3e-3, 1e-4)}
    workdir.record_config(path, changed, 40, diff)
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 40]
    assert history[1]["changed"] == {"optim.learning_rate": [3e-3, 1e-4]}
    assert history[1]["config"]["optim"]["learning_rate"] == 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 1e-4
    assert workdir.check_config(path, changed, allow_change=False) == {}   # the new record


def test_an_unreadable_record_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WorkdirError, match=r"config\.json"):
        workdir.check_config(epath.Path(tmp_path), _config(), allow_change=False)


def test_finished_needs_the_committed_checkpoint_of_the_result(tmp_path):
    path = epath.Path(tmp_path)
    assert not workdir.finished(path)
    (tmp_path / "result.json").write_text(json.dumps({"step": 6}))
    assert not workdir.finished(path)           # written before its checkpoint, which never came
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert not workdir.finished(path)
    (tmp_path / "checkpoints" / "6").mkdir()
    assert workdir.finished(path)


HOLDER = textwrap.dedent("""
    import sys, time
    from etils import epath
    from mla_rmt import workdir
    workdir.Lock(epath.Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_process_is_refused_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError) as error:
            workdir.Lock(epath.Path(tmp_path)).acquire()
        assert str(tmp_path) in str(error.value) and f'"pid": {holder.pid}' in str(error.value)
        with pytest.raises(WorkdirError, match="in use"):
            with workdir.claim(epath.Path(tmp_path), _config(), allow_change=False):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = workdir.Lock(epath.Path(tmp_path))
    lock.acquire()                                  # the dead holder's lock is stale
    assert f'"pid": {holder.pid}' in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    with workdir.claim(epath.Path(tmp_path), _config(), allow_change=False) as changed:
        assert changed == {}
        with pytest.raises(WorkdirError, match="in use"):   # held while the run goes on
            workdir.Lock(epath.Path(tmp_path)).acquire()
    workdir.Lock(epath.Path(tmp_path)).acquire()            # released at the end


def test_an_unwritable_workdir_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WorkdirError, match=r"--workdir=.*a_file/run: cannot write there"):
        with workdir.claim(epath.Path(blocker / "run"), _config(), allow_change=False):
            pass
