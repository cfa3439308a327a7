"""configs/replication.py, bench/replication.py and bench/replication_report.py on real trials:
two variants x two seeds of the config's tiny variant, run side by side in two calls, exported,
merged, reported; the report's numbers checked against float64 numpy computed here from the
export."""
import gzip
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mla_rmt import data, diagnostics, sweep, tokenizer
from mla_rmt.model_config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "replication.py")
T975 = {1: 12.706204736174707, 2: 4.302652729749464}   # t quantile 0.975, by degrees of freedom
CALLS = ("0,5", "6,11")     # the runner's calls in the fixture below: seeds 0, then seeds 1


def test_config_sweeps_six_variants_by_three_seeds_on_fixed_data():
    trials = sweep.load(CONFIG)
    variants = {(t["model.attention.kind"], t["model.attention.rope_fraction"]) for t in trials}
    assert variants == {("mha", 0.5), ("mla_prerope", 0.5), ("mla_decoupled", 0.5),
                        ("mla_decoupled", 0.25), ("mla_decoupled", 0.75), ("mha", 0.0)}
    assert len(trials) == 18 and {t["seed"] for t in trials} == {0, 1, 2}
    assert len({sweep.trial_name(t) for t in trials}) == 18
    config = sweep.load_config(CONFIG)
    assert all("data.shuffle_seed" not in t for t in trials)     # the same tokens for every trial
    assert 50 <= config.diagnostics.every <= 100 and config.data.max_epochs == 1.0
    assert (config.model.d_model, config.model.num_heads, config.model.d_head) == (768, 12, 64)
    for t in trials:              # the kind's defaults plus the literal cross-Gram, every kind
        tiny = sweep.apply(sweep.load_config(CONFIG + ":tiny"), t)
        cfg = ModelConfig.from_config(tiny.model)
        chosen = {m.name for m in diagnostics.configured_matrices(cfg, tiny.diagnostics)}
        defaults = {s.name for s in diagnostics.available(cfg) if s.default}
        assert chosen == defaults | {"qk_gram"} and "qk_gram" not in defaults


def test_gpu_config_reads_at_most_one_pass_of_the_train_split(data_cache):
    del data_cache
    config = sweep.load_config(CONFIG)
    tok = tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    counts = data.document_token_counts(config.data, tok, "train")
    shards = config.data.num_shards
    rows = config.data.global_batch_size // shards
    smallest = min(counts[s::shards].sum() for s in range(shards))
    assert config.train.num_steps * rows * (config.data.seq_len + 1) <= smallest
    assert config.train.num_steps >= 0.9 * smallest / (rows * (config.data.seq_len + 1))
    data.check_epochs(config, tok)
    config.train.num_steps = data.epoch_steps(config, tok) + 1
    with pytest.raises(data.ConfigError, match="config.train.num_steps"):
        data.check_epochs(config, tok)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    """bench.replication on trials 0, 5, 6, 11 of the tiny variant (mha f=0.5 and NoPE, seeds
    0 and 1) as two calls with their own workdirs, as on two machines: seeds 0, then seeds 1,
    which find their programs in the shared compilation cache; the two exports merged by
    bench.export_scalars, then the report on the merged export."""
    del data_cache
    root = tmp_path_factory.mktemp("replication")
    for trials in CALLS:
        proc = subprocess.run([sys.executable, "-m", "bench.replication", f"--config={CONFIG}:tiny",
                               f"--workdir={root / trials}", f"--out={root}", f"--trials={trials}",
                               "--deadline=1500"], cwd=REPO, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = root / "results" / "replication_prose"
    export = root / "scalars.json.gz"
    merge = subprocess.run([sys.executable, "-m", "bench.export_scalars", "--merge", str(export),
                            *(str(results / f"scalars.{trials}.json.gz") for trials in CALLS)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-3000:]
    report = subprocess.run([sys.executable, "bench/replication_report.py", str(export),
                             f"--out={root / 'report'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    with gzip.open(export, "rt") as f:
        exported = json.load(f)
    return {"root": root, "results": results, "export": export, "exported": exported,
            "report": root / "report", "stdout": report.stdout}


def final_and_best(run_entry):
    points = np.asarray(dict(run_entry["scalars"])["eval/loss"], np.float64)
    return points[-1, 1], points[:, 1].min(), points


def test_runner_records_corpus_logs_and_a_small_export(run):
    corpus, again = (json.loads((run["results"] / f"corpus.{trials}.json").read_text())
                     for trials in CALLS)
    assert corpus == again                      # the same documents and tokenizer in every call
    for split in ("train", "validation"):
        assert set(corpus["splits"][split]) == {"sotu", "bbc", "kjv"}
        assert all(row["tokens"] > row["words"] > 0 for row in corpus["splits"][split].values())
    assert corpus["vocab_size"] == 2048 and len(corpus["tokenizer_sha256"]) == 64
    assert sorted(p.name for p in run["results"].glob("log_*.txt")) == [
        "log_0.txt", "log_11.txt", "log_5.txt", "log_6.txt"]
    trials = run["exported"]
    assert len(trials) == 4 and all("result.json" in t and "config.json" in t for t in trials.values())
    assert {t["config.json"]["seed"] for t in trials.values()} == {0, 1}
    assert run["export"].stat().st_size < 200_000


def test_report_intervals_match_numpy(run):
    summary = pd.read_csv(run["report"] / "summary.csv")
    by_variant = {}
    for t in run["exported"].values():
        f = t["config.json"]["model"]["attention"]["rope_fraction"]
        by_variant.setdefault(f, []).append(np.exp(final_and_best(t)[0]))
    last = max(int(p[0]) for t in run["exported"].values() for p in dict(t["scalars"])["eval/loss"])
    for f, name in ((0.5, "mha f=0.5"), (0.0, "mha f=0 (NoPE)")):
        ppl = np.asarray(by_variant[f])
        half = T975[len(ppl) - 1] * ppl.std(ddof=1) / np.sqrt(len(ppl))
        row = summary[(summary["variant"] == name) & (summary["metric"] == "eval/perplexity")
                      & summary["when"].str.startswith(f"ppl @{last} ")]
        assert len(row) == 1 and row["n"].iloc[0] == 2
        np.testing.assert_allclose(row[["mean", "low", "high"]].to_numpy()[0],
                                   [ppl.mean(), ppl.mean() - half, ppl.mean() + half], rtol=1e-9)


def test_report_memorisation_check_and_matched_loss(run):
    text = (run["report"] / "report.md").read_text()
    finals = {}
    for name, t in run["exported"].items():
        final, best, _ = final_and_best(t)
        finals[name] = final
        verdict = "yes" if final / best - 1 <= 0.02 else "NO"
        assert f"| {name} |" in text
        line = next(l for l in text.splitlines() if l.startswith(f"| {name} |"))
        assert line.rstrip(" |").endswith(verdict)
    target = max(finals.values())
    assert f"matched eval loss {target:.4f}" in text
    summary = pd.read_csv(run["report"] / "summary.csv")
    for f, name in ((0.5, "mha f=0.5"), (0.0, "mha f=0 (NoPE)")):
        values = []
        for t in run["exported"].values():
            if t["config.json"]["model"]["attention"]["rope_fraction"] != f:
                continue
            _, _, ev = final_and_best(t)
            i = int(np.flatnonzero(ev[:, 1] <= target)[0])
            step = ev[0, 0] if i == 0 else ev[i - 1, 0] + (ev[i - 1, 1] - target) / (
                ev[i - 1, 1] - ev[i, 1]) * (ev[i, 0] - ev[i - 1, 0])
            scalars = dict(t["scalars"])
            layers = [np.asarray(v, np.float64) for k, v in scalars.items()
                      if k.startswith("spectral/qk_circuit_sum/mp_gap/layer_")]
            assert len(layers) == 4
            mean = np.mean([np.interp(step, l[:, 0], l[:, 1]) for l in layers])
            values.append(mean)
        row = summary[(summary["variant"] == name) & (summary["matrix"] == "qk_circuit_sum")
                      & (summary["metric"] == "mp_gap") & (summary["when"] == "matched loss")]
        np.testing.assert_allclose(row["mean"].iloc[0], np.mean(values), rtol=1e-9)
    init = summary[(summary["when"] == "init, step 0") & (summary["matrix"] == "qk_circuit_sum")]
    assert set(init["metric"]) >= {"mp_gap", "outlier_energy"}
    heads = summary[(summary["when"] == "init, step 0") & (summary["matrix"] == "qk_circuit")]
    assert set(heads["metric"]) >= {"mp_gap/head_mean", "mp_gap/head_max"}
    for fig in ("eval_loss.png", "qk_circuit_sum_by_layer.png", "qk_circuit_over_steps.png"):
        assert (run["report"] / "figures" / fig).read_bytes()[:4] == b"\x89PNG"


def test_report_differences_match_welch(run):
    """NoPE − mha f=0.5, the one pair of the papers' comparisons among these trials: the final
    perplexity and the layer-mean qk_circuit_sum mp_gap at the last spectra step, against
    scipy's Welch interval of the exported values."""
    from scipy import stats
    summary = pd.read_csv(run["report"] / "summary.csv")
    contrast = summary[(summary["matrix"] == "contrast")
                       & (summary["variant"] == "mha f=0 (NoPE) - mha f=0.5")]
    ppl, gap = {0.0: [], 0.5: []}, {0.0: [], 0.5: []}
    for t in run["exported"].values():
        f = t["config.json"]["model"]["attention"]["rope_fraction"]
        ppl[f].append(np.exp(final_and_best(t)[0]))
        layers = [np.asarray(v, np.float64) for k, v in t["scalars"].items()
                  if k.startswith("spectral/qk_circuit_sum/mp_gap/layer_")]
        gap[f].append(np.mean([l[l[:, 0].argmax(), 1] for l in layers]))
    for values, metric in ((ppl, "eval ppl, last"), (gap, "qk_circuit_sum mp_gap, step 20")):
        ci = stats.ttest_ind(values[0.0], values[0.5], equal_var=False).confidence_interval()
        row = contrast[contrast["metric"] == metric]
        assert len(row) == 1, sorted(contrast["metric"])
        np.testing.assert_allclose(
            row[["mean", "low", "high"]].to_numpy()[0],
            [np.mean(values[0.0]) - np.mean(values[0.5]), ci.low, ci.high], rtol=1e-6)
    over = summary[(summary["variant"] == "mha f=0.5") & (summary["matrix"] == "qk_circuit_sum")
                   & (summary["metric"] == "mp_gap") & (summary["when"] == "step 10")]
    step10 = [np.mean([dict(l.tolist())[10.0] for l in (
        np.asarray(v, np.float64) for k, v in t["scalars"].items()
        if k.startswith("spectral/qk_circuit_sum/mp_gap/layer_"))])
        for t in run["exported"].values()
        if t["config.json"]["model"]["attention"]["rope_fraction"] == 0.5]
    assert len(over) == 1 and len(step10) == 2
    np.testing.assert_allclose(over["mean"].iloc[0], np.mean(step10), rtol=1e-9)
    text = (run["report"] / "report.md").read_text()
    assert "| mha f=0 (NoPE) − mha f=0.5 |" in text
    assert "mla_decoupled f=0.5 − mha f=0.5" not in text       # a pair without its trials


def test_report_reads_matrix_and_metric_names_from_the_tags(run, tmp_path):
    renamed = {}
    for name, t in run["exported"].items():
        scalars = {}
        for tag, points in t["scalars"].items():        # names no code of the report knows
            tag = tag.replace("spectral/qk_circuit/", "spectral/qk_heads_x/")
            tag = tag.replace("spectral/qk_circuit_sum/", "spectral/qk_layer_y/")
            scalars[tag] = points
        renamed[name] = {**t, "scalars": scalars}
    path = tmp_path / "renamed.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(renamed, f)
    proc = subprocess.run([sys.executable, "bench/replication_report.py", str(path),
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### qk_heads_x: mp_gap/head_max (layer mean)" in text
    assert "### qk_layer_y: mp_gap (layer mean)" in text
    assert "### qk_circuit:" not in text and "### qk_circuit_sum:" not in text
    assert (tmp_path / "out" / "figures" / "qk_layer_y_by_layer.png").exists()
