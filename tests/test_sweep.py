"""The tiny RoPE-budget sweep end to end: run directories, summaries, HParams, skip, failure.

Most tests read the session's finished sweep (conftest's `tiny_sweep_workdir`: four of the ten
trials, one of each kind, for 20 steps with spectra and probes every 5); tests that run main
again work on copies.
"""
import ast
import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import time

import numpy as np
import pytest
from conftest import REPO, TINY_SWEEP, TINY_SWEEP_TRIALS, main_command, read_scalars, run_main

from mla_rmt import main, sweep

CONFIG = "configs/rope_budget_sweep.py:tiny"
STEPS = 20
# Trial directory -> (attention kind, rope_fraction), as configs/rope_budget_sweep.py declares
# them: the 3 x 3 product in order, then NoPE; the session's sweep ran the TINY_SWEEP_TRIALS.
ALL_TRIALS = {f"kind={kind},rope_fraction={text}": (kind, float(text))
              for kind in ("mha", "mla_prerope", "mla_decoupled") for text in ("0.25", "0.5", "0.75")}
ALL_TRIALS["kind=mha,rope_fraction=0"] = ("mha", 0.0)
TRIALS = {name: ALL_TRIALS[name] for i, name in enumerate(ALL_TRIALS) if i in TINY_SWEEP_TRIALS}
FINAL = ("final/eval_loss", "final/eval_perplexity", "final/max_mp_gap", "final/mean_outlier_energy",
         "final/max_head_mp_gap")


@functools.lru_cache(maxsize=None)
def scalars(run_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    return read_scalars(run_dir)


def hparams_data(run_dir: pathlib.Path) -> dict[str, list]:
    """'_hparams_/<entry>' -> the decoded HParamsPluginData of each event file that has it."""
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=import-outside-toplevel
    out: dict[str, list] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams")
        except KeyError:          # a file without HParams (the training summaries)
            continue
        for tag, content in contents.items():
            out.setdefault(tag, []).append(plugin_data_pb2.HParamsPluginData.FromString(content))
    return out


def _value(proto_value):
    return getattr(proto_value, proto_value.WhichOneof("kind"))


def test_one_run_directory_per_selected_trial_named_from_the_swept_values(tiny_sweep_workdir):
    assert sorted(p.name for p in tiny_sweep_workdir.iterdir()) == sorted(TRIALS)   # no others
    for name, (kind, fraction) in TRIALS.items():
        run_dir = tiny_sweep_workdir / name
        result = json.loads((run_dir / "result.json").read_text())
        assert result["step"] == STEPS, name
        assert math.isfinite(result["eval/loss"]), name
        attention = json.loads((run_dir / "config.json").read_text())["model"]["attention"]
        assert (attention["kind"], attention["rope_fraction"]) == (kind, fraction), name
        assert (run_dir / "checkpoints" / str(STEPS)).is_dir(), name


def test_every_trial_logs_train_eval_perf_spectral_and_activation_tags(tiny_sweep_workdir):
    finals = {}
    for name, (kind, fraction) in TRIALS.items():
        values = scalars(tiny_sweep_workdir / name)
        assert sorted(values["train/loss"]) == list(range(1, STEPS + 1)), name
        assert sorted(values["eval/loss"]) == [10, 20], name
        for tag in ("train/grad_norm", "train/learning_rate", "eval/perplexity",
                    "perf/tokens_per_sec", "perf/step_time_sec"):
            assert tag in values, (name, tag)
        matrices = {"qk_circuit_sum", "qk_circuit"}
        if kind == "mla_decoupled" and 0 < fraction < 1:
            matrices |= {"qk_circuit_content", "qk_circuit_rope", "qk_circuit_sum_content",
                         "qk_circuit_sum_rope"}
        assert {t.split("/")[1] for t in values if t.startswith("spectral/")} == matrices, name
        for matrix in matrices:
            suffixes = (("head_mean/layer_00", "head_max/layer_03", "head_mean/mean", "head_max/max")
                        if matrix.startswith("qk_circuit") and "sum" not in matrix
                        else ("layer_00", "layer_03", "mean", "max"))
            for metric in ("mp_gap", "outlier_energy", "stable_rank"):
                for suffix in suffixes:
                    assert sorted(values[f"spectral/{matrix}/{metric}/{suffix}"]) == [0, 5, 10, 15]
        for metric in ("attn_sigma_ratio", "attn_entropy_bits", "rep_stable_rank"):
            for layer in ("layer_00", "layer_03"):
                assert sorted(values[f"activations/{metric}/{layer}"]) == [5, 10, 15, 20], name
        diagnostic = [t for t in values if t.startswith(("spectral/", "activations/"))]
        assert len(diagnostic) > 100, name
        for tag, series in values.items():
            assert all(math.isfinite(v) for v in series.values()), (name, tag)
        finals[name] = values["train/loss"][STEPS]
        assert finals[name] < values["train/loss"][1], name
    assert len(set(finals.values())) == len(TRIALS)      # different models, not one four times


def test_hparams_hold_the_swept_values_and_final_metrics(tiny_sweep_workdir):
    for name, (kind, fraction) in TRIALS.items():
        run_dir = tiny_sweep_workdir / name
        plugin = hparams_data(run_dir)
        assert sorted(plugin) == ["_hparams_/experiment", "_hparams_/session_end_info",
                                  "_hparams_/session_start_info"], name
        assert all(len(v) == 1 for v in plugin.values()), name      # one HParams entry
        hparams = {k: _value(v) for k, v in plugin["_hparams_/session_start_info"][0]
                   .session_start_info.hparams.items()}
        assert hparams == {"model.attention.kind": kind, "model.attention.rope_fraction": fraction,
                           "model.attention.remove_gap": False, "status": "finished"}, name
        experiment = plugin["_hparams_/experiment"][0].experiment
        assert sorted(m.name.tag for m in experiment.metric_infos) == sorted(FINAL), name
        assert plugin["_hparams_/session_end_info"][0].session_end_info.status == 1  # SUCCESS

        values, result = scalars(run_dir), json.loads((run_dir / "result.json").read_text())
        final = {tag: values[tag][STEPS] for tag in FINAL}
        np.testing.assert_allclose(final["final/eval_loss"], values["eval/loss"][STEPS], rtol=1e-6)
        np.testing.assert_allclose(final["final/eval_loss"], result["eval/loss"], rtol=1e-6)
        np.testing.assert_allclose(final["final/eval_perplexity"],
                                   math.exp(result["eval/loss"]), rtol=1e-5)
        # The diagnostic summaries reduce the last spectra over the layers of qk_circuit_sum.
        last = max(values["spectral/qk_circuit_sum/mp_gap/max"])
        layers = [values[f"spectral/qk_circuit_sum/mp_gap/layer_{i:02d}"][last] for i in range(4)]
        energies = [values[f"spectral/qk_circuit_sum/outlier_energy/layer_{i:02d}"][last] for i in range(4)]
        np.testing.assert_allclose(final["final/max_mp_gap"], max(layers), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(final["final/max_mp_gap"], result["spectral/qk_circuit_sum/mp_gap/max"],
                                   rtol=1e-6)
        np.testing.assert_allclose(final["final/mean_outlier_energy"], np.mean(energies),
                                   rtol=1e-5, atol=1e-7)
        heads = [values[f"spectral/qk_circuit/mp_gap/head_max/layer_{i:02d}"][last] for i in range(4)]
        np.testing.assert_allclose(final["final/max_head_mp_gap"], max(heads), rtol=1e-5, atol=1e-7)


def test_rerun_skips_every_finished_trial_quickly(tiny_sweep_workdir, tmp_path):
    workdir = tmp_path / "sweep"
    shutil.copytree(tiny_sweep_workdir, workdir)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    start = time.perf_counter()
    proc = run_main(workdir, *TINY_SWEEP, config=CONFIG)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in TRIALS:
        assert f"Trial {workdir / name} already finished: skipping." in proc.stderr, name
        assert f"  skipped   {name}" in proc.stderr, name
    assert "Model:" not in proc.stderr and "Resuming" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before   # nothing written
    assert seconds < 60, f"skipping {len(TRIALS)} finished trials took {seconds:.0f}s"


@pytest.mark.parametrize("spec, indices", [("", list(range(10))), ("3", [3]), ("0-2", [0, 1, 2]),
                                           ("0,4,8-9", [0, 4, 8, 9]), (" 9, 0 ", [9, 0]), ("1,1-2", [1, 2])])
def test_select_reads_indices_and_ranges_in_order(spec, indices):
    assert sweep.select(spec, 10) == indices


@pytest.mark.parametrize("spec, error", [("10", r"\[10\] not in the sweep's trials 0..9"),
                                         ("2-12", r"\[10, 11, 12\] not in"), ("a", "'a' is not a trial index"),
                                         ("1,,2", "'' is not a trial index"), ("-1", "'-1' is not")])
def test_select_names_a_bad_spec(spec, error):
    with pytest.raises(ValueError, match=error):
        sweep.select(spec, 10)


def test_list_trials_prints_the_ten_trials(parse, capsys):
    parse(f"--config={REPO / CONFIG}", "--list_trials")
    main.main(["main"])
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert [r[1] for r in rows] == list(ALL_TRIALS)
    declared = sweep.load(f"{REPO / 'configs/rope_budget_sweep.py'}:tiny")
    assert [ast.literal_eval(r[2]) for r in rows] == declared
    for (name, (kind, fraction)), overrides in zip(ALL_TRIALS.items(), declared):
        assert overrides == {"model.attention.kind": kind, "model.attention.rope_fraction": fraction}


FAILING_SWEEP = '''"""Three trials of the tiny RoPE-budget sweep; the middle one reads a corpus that is not there."""
import importlib.util

_spec = importlib.util.spec_from_file_location("rope_budget_sweep", {path!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg="tiny"):
    return _base.get_config(arg)


def get_sweep(arg="tiny"):
    trials = _base.get_sweep(arg)
    missing = {{**trials[4], "data.source": "text_files", "data.text_glob": {glob!r}}}
    return [trials[0], missing, trials[-1]]
'''


def test_a_failed_trial_does_not_stop_the_others_and_fails_the_sweep(tmp_path, data_cache):
    del data_cache
    config = tmp_path / "failing_sweep.py"
    config.write_text(FAILING_SWEEP.format(path=str(REPO / "configs/rope_budget_sweep.py"),
                                           glob=str(tmp_path / "no_such_corpus" / "*.txt")))
    workdir = tmp_path / "sweep"
    proc = run_main(workdir, "--config.train.num_steps=3", "--config.train.log_every=1",
                    "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
                    "--config.diagnostics.every=0", config=str(config) + ":tiny")
    assert proc.returncode == 1, proc.stderr[-3000:]
    trial_dirs = [p.name for p in sorted(workdir.iterdir())]
    finished = ["kind=mha,rope_fraction=0.25", "kind=mha,rope_fraction=0"]
    failed = [n for n in trial_dirs if n not in finished]
    names = [sweep.trial_name(overrides) for overrides in sweep.load(f"{config}:tiny")]  # as main names them
    assert names[0] == finished[0] and names[2] == finished[1], names
    broken = names[1]
    assert broken.startswith("kind=mla_prerope,rope_fraction=0.5,source=text_files,text_glob=")
    for name in finished:       # the trial after the failed one ran too
        assert json.loads((workdir / name / "result.json").read_text())["step"] == 3, name
        assert f"  finished  {name}" in proc.stderr
    assert not (workdir / broken / "result.json").exists()
    assert failed in ([], [broken])
    assert f"Trial {workdir / broken} failed: ConfigError: config.data.text_glob" in proc.stderr
    assert f"  failed    {broken}" in proc.stderr
    assert f"1 trial(s) failed: {broken}" in proc.stderr
    assert "Traceback" not in proc.stderr


SHORT = ("--config.train.num_steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
         "--config.train.checkpoint_every=3", "--config.diagnostics.every=0")


def test_an_unexpected_error_in_the_middle_trial_is_contained_and_recorded(tmp_path, data_cache):
    del data_cache
    workdir = tmp_path / "sweep"
    broken = workdir / "kind=mla_prerope,rope_fraction=0.5"
    broken.mkdir(parents=True)
    (broken / "checkpoints").write_text("a file where the checkpoints directory should be")
    proc = run_main(workdir, *SHORT, "--trial=0,4,9", config=CONFIG)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for name in ("kind=mha,rope_fraction=0.25", "kind=mha,rope_fraction=0"):   # before and after it
        assert json.loads((workdir / name / "result.json").read_text())["step"] == 3, name
        assert f"  finished  {name}" in proc.stderr
    assert f"Trial {broken} failed: " in proc.stderr
    assert "Traceback" in proc.stderr                 # an unexpected error keeps its traceback
    assert f"  failed    {broken.name}" in proc.stderr and f"1 trial(s) failed: {broken.name}" in proc.stderr
    plugin = hparams_data(broken)                     # the failed trial is a row of the table
    start = plugin["_hparams_/session_start_info"][0].session_start_info
    assert start.hparams["status"].string_value == "failed"
    assert start.hparams["model.attention.kind"].string_value == "mla_prerope"
    assert plugin["_hparams_/session_end_info"][0].session_end_info.status == 2     # FAILURE


def test_two_trials_started_together_on_a_fresh_cache_both_succeed(tmp_path):
    env = dict(os.environ, MLA_RMT_CACHE=str(tmp_path / "fresh_cache"))
    workdir = tmp_path / "sweep"
    procs = [subprocess.Popen(main_command(workdir, *SHORT, f"--trial={i}", config=CONFIG),
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in (0, 4)]
    logs = [p.communicate(timeout=900)[1] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    for name in ("kind=mha,rope_fraction=0.25", "kind=mla_prerope,rope_fraction=0.5"):
        assert json.loads((workdir / name / "result.json").read_text())["step"] == 3, name
    assert len(list((tmp_path / "fresh_cache" / "tokenizers").glob("*.model"))) == 1
    assert not list((tmp_path / "fresh_cache" / "tokenizers").glob("*.tmp*"))
