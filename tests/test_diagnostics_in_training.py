"""Diagnostics inside the train step: they change nothing, and `analyze` reproduces them offline."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_OVERRIDES, REPO, read_scalars

from mla_rmt import analyze, presets, sweep, train

# The default bfloat16 compute: with it the spectra step's update is the plain step's bit for
# bit; with float32 compute under the suite's -O0 it is the same to rounding only
# (tests/test_step.py).
RUN = {**FAST_OVERRIDES, "model.dtype": "bfloat16", "model.attention.kind": "mla_decoupled",
       "model.attention.rope_fraction": 0.5, "train.num_steps": 10, "train.log_every": 1,
       "train.eval_every": 5, "train.checkpoint_every": 5,
       "diagnostics.images_every": 300}   # images at step 0 only: host work these tests don't read


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """The same short run with spectra and probes every step, with diagnostics off, and every
    3 steps (the trainer alternates the spectra step and the plain one), in this process."""
    del data_cache
    on, off, every3 = (tmp_path_factory.mktemp(n) for n in ("diag_on", "diag_off", "diag_every3"))
    for workdir, every in ((on, 1), (off, 0), (every3, 3)):
        config = sweep.apply(presets.apply_model_preset(presets.base_config(), "tiny"),
                             {**RUN, "diagnostics.every": every})
        assert train.train_and_evaluate(config, str(workdir)).status == "finished"
    return on, off, every3


def test_diagnostics_leave_the_losses_unchanged(runs):
    on, off, every3 = (read_scalars(w) for w in runs)
    assert sorted(on["train/loss"]) == list(range(1, 11))
    assert on["train/loss"] == off["train/loss"] == every3["train/loss"]   # bit-identical
    assert on["eval/loss"] == off["eval/loss"] == every3["eval/loss"]
    assert not any(tag.startswith(("spectral/", "activations/")) for tag in off)
    # Every 3 steps: the spectra of the params after 0, 3, 6, 9 updates, equal to the every-step run's.
    for tag in ("spectral/qk_circuit_sum/mp_gap/layer_00", "spectral/qk_circuit_sum_rope/lambda_max/max",
                "spectral/qk_circuit/mp_gap/head_max/layer_01"):
        assert sorted(every3[tag]) == [0, 3, 6, 9]
        assert every3[tag] == {s: on[tag][s] for s in (0, 3, 6, 9)}


def test_spectral_and_activation_tags(runs):
    scalars = read_scalars(runs[0])
    per_layer = ("layer_00", "layer_03", "mean", "max")
    per_head = ("head_mean/layer_00", "head_max/layer_03", "head_mean/mean", "head_max/max")
    matrices = {"qk_circuit_sum": per_layer, "qk_circuit_sum_content": per_layer,
                "qk_circuit_sum_rope": per_layer, "qk_circuit": per_head,
                "qk_circuit_content": per_head, "qk_circuit_rope": per_head}
    assert {t.split("/")[1] for t in scalars if t.startswith("spectral/")} == set(matrices)
    for matrix, suffixes in matrices.items():
        for metric in ("mp_gap", "outlier_count", "outlier_energy", "stable_rank", "lambda_plus"):
            for suffix in suffixes:
                values = scalars[f"spectral/{matrix}/{metric}/{suffix}"]
                assert sorted(values) == list(range(10))        # params after 0..9 updates
                assert all(math.isfinite(v) for v in values.values())
        if suffixes is per_head:     # the head max is a max, the head mean a mean
            assert all(scalars[f"spectral/{matrix}/mp_gap/head_max/layer_{l:02d}"][s]
                       >= scalars[f"spectral/{matrix}/mp_gap/head_mean/layer_{l:02d}"][s]
                       for l in range(4) for s in range(10))
    for metric in ("attn_sigma1", "attn_sigma2", "attn_sigma_ratio", "attn_entropy_bits",
                   "rep_stable_rank"):
        assert all(math.isfinite(v) for v in scalars[f"activations/{metric}/layer_00"].values())
    # The spectra move as the weights train: the values are not a constant written each step.
    lam = scalars["spectral/qk_circuit/lambda_max/head_max/max"]
    assert lam[9] != lam[0]


def test_analyze_equals_the_in_step_values(runs):
    workdir = runs[0]
    out = workdir / "analysis.json"
    proc = subprocess.run([sys.executable, "-m", "mla_rmt.analyze", f"--workdir={workdir}",
                           "--step=5", f"--output={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qk_circuit_sum_rope" in proc.stdout and "mp_gap" in proc.stdout
    offline = json.loads(out.read_text())
    assert offline["step"] == 5
    logged = read_scalars(workdir)
    tags = [t for t in offline["scalars"] if t.startswith("spectral/")]
    assert len(tags) > 100
    for tag in tags:
        np.testing.assert_allclose(offline["scalars"][tag], logged[tag][5], rtol=1e-5, atol=1e-6,
                                   err_msg=tag)
    assert len(offline["layers"]["qk_circuit"]["mp_gap"]) == 4           # [L, H]
    assert len(offline["layers"]["qk_circuit"]["mp_gap"][0]) == 4


def test_analyze_names_a_missing_step(runs):
    with pytest.raises(ValueError, match=r"--step=7: no such checkpoint .*\[5, 10\]"):
        analyze.analyze(str(runs[0]), step=7)
