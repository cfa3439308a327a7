"""events (TensorBoard -> pandas) and plots (figures) on tables built here, and the images that
training writes, read back from the tiny sweep."""
import io
import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import tensorboardX
from matplotlib.collections import LineCollection
from PIL import Image

from mla_rmt import events, plots, spectral
from mla_rmt.experiments import rank_collapse

STEPS = (0, 25, 50, 75)
TRIALS = {  # name -> (kind, rope_fraction, remove_gap)
    "kind=mha,rope_fraction=0.5": ("mha", 0.5, False),
    "kind=mha,rope_fraction=0.25": ("mha", 0.25, False),
    "kind=mla_decoupled,rope_fraction=0.25": ("mla_decoupled", 0.25, False),
    "kind=mha,remove_gap=True": ("mha", 1.0, True),
}


def layer_rows(trial, family_tag, values_LxS, steps=STEPS):
    """load_scalars rows of one per-layer metric: tag f'{family_tag}/layer_LL'."""
    return [(trial, f"{family_tag}/layer_{l:02d}", s, float(values_LxS[l, j]))
            for l in range(values_LxS.shape[0]) for j, s in enumerate(steps)]


@pytest.fixture
def synthetic():
    """Scalars of 4 trials x 3 layers x 4 steps with known values, and their trial table."""
    rng = np.random.default_rng(0)
    values, rows = {}, []
    for trial in TRIALS:
        for matrix, metric in (("qk_gram", "mp_gap"), ("qk_gram", "outlier_energy"),
                               ("qk_gram", "stable_rank"), ("qk_gram", "stable_rank_frac"),
                               ("qk_circuit", "mp_gap")):
            v = rng.random((3, len(STEPS)))
            values[trial, matrix, metric] = v
            rows += layer_rows(trial, f"spectral/{matrix}/{metric}", v)
        v = rng.random((3, len(STEPS))) + 1
        values[trial, None, "rep_stable_rank"] = v
        rows += layer_rows(trial, "activations/rep_stable_rank", v)
        rows += [(trial, "spectral/qk_gram/mp_gap/max", s, 9.0) for s in STEPS]
        rows.append((trial, "train/loss", 10, 3.0))
    scalars = pd.DataFrame(rows, columns=["trial", "tag", "step", "value"])
    trials = pd.DataFrame([{"trial": t, "kind": k, "rope_fraction": f, "remove_gap": g,
                            "finished": True, "step": 100, "eval/loss": np.log(50.0 + i),
                            "eval/perplexity": 50.0 + i}
                           for i, (t, (k, f, g)) in enumerate(TRIALS.items())])
    return scalars, trials, values


def horizontal_levels(ax):
    """The y of each segment of each line collection (a violin's medians, minima, maxima)."""
    return [[seg[0, 1] for seg in c.get_segments()] for c in ax.collections
            if isinstance(c, LineCollection)]


def panels(fig):
    """The figure's axes without colorbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


# events ------------------------------------------------------------------------------------------

def test_load_scalars_round_trips_tensorboardx(tmp_path):
    written = []
    for trial in ("kind=mha,rope_fraction=0.25", "kind=mla_decoupled,rope_fraction=0.5"):
        writer = tensorboardX.SummaryWriter(str(tmp_path / trial), filename_suffix=".a")
        for step in range(0, 30, 10):
            for tag in ("train/loss", "spectral/qk_gram/mp_gap/layer_01", "activations/rep_stable_rank/layer_00"):
                value = step / 8 + len(tag) + len(trial)      # exactly representable in float32
                writer.add_scalar(tag, value, step)
                written.append((trial, tag, step, value))
        writer.close()
    # A resumed run re-logs step 20 in a newer file: the newer value wins.
    trial = "kind=mha,rope_fraction=0.25"
    writer = tensorboardX.SummaryWriter(str(tmp_path / trial), filename_suffix=".b")
    writer.add_scalar("train/loss", -1.5, 20)
    writer.close()
    written = [(t, g, s, -1.5 if (t, g, s) == (trial, "train/loss", 20) else v) for t, g, s, v in written]
    (tmp_path / trial / "checkpoints").mkdir()              # not a trial

    got = events.load_scalars(tmp_path)
    assert list(got.columns) == ["trial", "tag", "step", "value"]
    assert sorted(got.itertuples(index=False, name=None)) == sorted(written)
    assert events.load_scalars(tmp_path, prefix="train/")["tag"].unique().tolist() == ["train/loss"]


def test_load_scalars_of_a_single_run_and_of_nothing(tmp_path):
    writer = tensorboardX.SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("eval/perplexity", 12.5, 7)
    writer.close()
    got = events.load_scalars(tmp_path / "run")
    assert got.values.tolist() == [["run", "eval/perplexity", 7, 12.5]]
    empty = events.load_scalars(tmp_path / "run", prefix="spectral/")
    assert empty.empty and list(empty.columns) == ["trial", "tag", "step", "value"]


def test_trial_table_from_config_result_and_names(tmp_path):
    done = tmp_path / "kind=mla_prerope,rope_fraction=0.5"
    done.mkdir()
    config = {"model": {"attention": {"kind": "mla_prerope", "rope_fraction": 0.5, "remove_gap": True}}}
    (done / "config.json").write_text(json.dumps(config))
    (done / "result.json").write_text(json.dumps({"step": 150, "eval/perplexity": 74.5}))
    running = tmp_path / "kind=gqa,rope_fraction=0.25"
    running.mkdir()
    writer = tensorboardX.SummaryWriter(str(running))
    writer.add_scalar("train/loss", 1.0, 1)
    writer.close()

    table = events.trial_table(tmp_path).set_index("trial")
    assert len(table) == 2
    row = table.loc["kind=mla_prerope,rope_fraction=0.5"]
    assert (row.kind, row.rope_fraction, row.remove_gap, row.finished) == ("mla_prerope", 0.5, True, True)
    assert (row.step, row["eval/perplexity"]) == (150, 74.5)
    row = table.loc["kind=gqa,rope_fraction=0.25"]             # no config.json: from the name
    assert (row.kind, row.rope_fraction, row.remove_gap, row.finished) == ("gqa", 0.25, False, False)
    assert np.isnan(row["eval/perplexity"])


def test_parse_layer_tags_splits_and_drops():
    scalars = pd.DataFrame([("t", "spectral/qk_gram_rope/outlier_energy/layer_03", 5, 0.5),
                            ("t", "activations/rep_stable_rank/layer_11", 5, 2.0),
                            ("t", "spectral/qk_gram/mp_gap/mean", 5, 1.0),
                            ("t", "spectral/qk_gram/eigenvalues/layer_x", 5, 1.0),
                            ("t", "train/loss", 5, 3.0)], columns=["trial", "tag", "step", "value"])
    got = events.parse_layer_tags(scalars)
    assert got[["family", "metric", "layer", "value"]].values.tolist() == [
        ["spectral", "outlier_energy", 3, 0.5], ["activations", "rep_stable_rank", 11, 2.0]]
    assert got["matrix"][0] == "qk_gram_rope" and pd.isna(got["matrix"][1])


# Figures from arrays ---------------------------------------------------------------------------

def product_esd(rng, n=256, k=48):
    a, b = rng.standard_normal((2, n, k))
    return np.linalg.svd(a @ b.T, compute_uv=False)[:k] ** 2


def vertical_lines(ax):
    return [line.get_xdata()[0] for line in ax.lines
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]


@pytest.mark.parametrize("null", ["product", "mp"])
def test_esd_figure_marks_lambda_plus_and_scales_the_null_density(null):
    rng = np.random.default_rng(1)
    eigs = product_esd(rng)
    gammas = spectral.chain_gammas((256, 48, 256))
    law = spectral.null_law(gammas, null)
    metrics = spectral.mp_metrics(eigs, gammas, null)
    lam_plus, scale = float(metrics["lambda_plus"]), float(metrics["bulk_scale"])
    np.testing.assert_allclose(lam_plus / law.edge, scale, rtol=1e-5)   # the scale the figure uses

    fig = plots.esd_figure(eigs, law, lam_plus, "layer 3", gammas=gammas)
    ax, = fig.axes
    assert ax.get_title() == "layer 3"
    assert vertical_lines(ax) == [pytest.approx(lam_plus)]
    density, = [l for l in ax.lines if l.get_label() == "null density"]
    x, rho = (np.asarray(v, np.float64) for v in density.get_data())
    assert np.sum(rho[1:] * np.diff(x)) == pytest.approx(1.0, abs=0.03)   # a density in lambda
    support = x[rho > 0]
    assert support.max() == pytest.approx(lam_plus, rel=0.01)            # its edge is lambda_plus
    assert sum(p.get_height() * p.get_width() for p in ax.patches) == pytest.approx(1.0)


def test_esd_figure_per_head_and_sampled_null():
    rng = np.random.default_rng(2)
    gammas = spectral.chain_gammas((256, 48, 256))
    law = spectral.null_law(gammas)
    eigs_HxP = np.stack([product_esd(rng) * (h + 1) for h in range(3)])
    lam_plus_H = np.asarray(spectral.mp_metrics(eigs_HxP, gammas)["lambda_plus"], np.float64)
    ax, = plots.esd_figure(eigs_HxP, law, lam_plus_H, "pooled", gammas=gammas).axes
    assert vertical_lines(ax) == [pytest.approx(lam_plus_H.mean())]
    x, rho = (np.asarray(v, np.float64) for v in ax.lines[0].get_data())
    assert np.sum(rho[1:] * np.diff(x)) == pytest.approx(1.0, abs=0.03)   # a mixture of densities
    assert x[rho > 0].max() == pytest.approx(lam_plus_H.max(), rel=0.01)
    assert sum(p.get_height() * p.get_width() for p in ax.patches if p.get_label() != "λ+ per head") \
        == pytest.approx(1.0)

    sampled = spectral.empirical_null_law(rng.random((4, 48)))          # no gammas: no density
    ax, = plots.esd_figure(eigs_HxP[0], sampled, lam_plus_H[0], "sampled").axes
    assert not [l for l in ax.lines if l.get_label() == "null density"]
    assert vertical_lines(ax) == [pytest.approx(lam_plus_H[0])]
    with pytest.raises(ValueError, match="gammas"):
        plots.esd_figure(eigs_HxP[0], law, lam_plus_H[0], "wrong", gammas=(0.5,))
    with pytest.raises(ValueError, match="eigs"):
        plots.esd_figure(eigs_HxP[0], law, lam_plus_H, "flat eigs, per-head lambda_plus")


def test_layer_step_heatmap_shows_its_input():
    values_LxS = np.arange(12.0).reshape(3, 4)
    fig = plots.layer_step_heatmap(values_LxS, [0, 250, 500, 750], "qk_gram: mp_gap", "mp_gap")
    ax, = panels(fig)
    assert len(fig.axes) == 2                                            # and a colorbar
    assert ax.get_title() == "qk_gram: mp_gap"
    np.testing.assert_array_equal(ax.images[0].get_array(), values_LxS)  # layer l in row l
    assert ax.images[0].origin == "lower"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "250", "500", "750"]
    with pytest.raises(ValueError, match="steps"):
        plots.layer_step_heatmap(values_LxS, [0, 1], "wrong")


def test_figure_to_image_is_rgb_uint8_of_the_figure():
    fig = plots.layer_step_heatmap(np.random.default_rng(0).random((4, 6)), range(6), "t",
                                   panel=(4.0, 3.0), dpi=50)
    image = plots.figure_to_image(fig)
    assert image.shape == (150, 200, 3) and image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20            # not blank
    assert (image == 255).all(axis=-1).mean() > 0.2                      # white margins around it


# Figures from the tables -------------------------------------------------------------------------

def test_mp_gap_heatmaps_one_panel_per_trial(synthetic):
    scalars, _, values = synthetic
    for matrix in ("qk_gram", "qk_circuit"):
        fig = plots.mp_gap_heatmaps(scalars, matrix=matrix)
        axes = panels(fig)
        assert len(axes) == len(TRIALS) and len(fig.axes) == len(TRIALS) + 1
        order = ["kind=mha,rope_fraction=0.25", "kind=mha,rope_fraction=0.5",
                 "kind=mha,remove_gap=True", "kind=mla_decoupled,rope_fraction=0.25"]
        assert [ax.get_title() for ax in axes] == [t.replace(",", ", ") for t in order]
        for ax, trial in zip(axes, order):
            np.testing.assert_array_equal(ax.images[0].get_array(), values[trial, matrix, "mp_gap"])
        assert len({ax.images[0].get_clim() for ax in axes}) == 1          # one colour scale
    with pytest.raises(ValueError, match="qk_gram_rope"):
        plots.mp_gap_heatmaps(scalars, matrix="qk_gram_rope")


def test_outlier_energy_violins_group_by_kind_and_rope_budget(synthetic):
    scalars, trials, values = synthetic
    fig = plots.outlier_energy_violins(scalars, trials, matrix="qk_gram")
    assert [ax.get_title() for ax in fig.axes] == ["mha", "mla_decoupled"]
    mha = fig.axes[0]
    assert [t.get_text() for t in mha.get_xticklabels()] == ["0.25", "0.5", "1\nremove_gap"]
    medians = [np.median(values[t, "qk_gram", "outlier_energy"]) for t in
               ("kind=mha,rope_fraction=0.25", "kind=mha,rope_fraction=0.5", "kind=mha,remove_gap=True")]
    assert any(np.allclose(levels, medians) for levels in horizontal_levels(mha))
    late = plots.outlier_energy_violins(scalars, trials, matrix="qk_gram", min_step=50)    # later steps only
    want = np.median(values["kind=mla_decoupled,rope_fraction=0.25", "qk_gram", "outlier_energy"][:, 2:])
    assert [want] in [pytest.approx(levels) for levels in horizontal_levels(late.axes[1])]
    assert [np.median(values["kind=mla_decoupled,rope_fraction=0.25", "qk_gram", "outlier_energy"])] \
        not in [pytest.approx(levels) for levels in horizontal_levels(late.axes[1])]


@pytest.mark.parametrize("metric", ["stable_rank", "stable_rank_frac"])
def test_stable_rank_curves_one_line_per_layer(synthetic, metric):
    scalars, _, values = synthetic
    fig = plots.stable_rank_curves(scalars, matrix="qk_gram", metric=metric)
    assert len(fig.axes) == len(TRIALS)
    ax = fig.axes[0]
    assert ax.get_title() == "kind=mha, rope_fraction=0.25" and ax.get_ylabel() == metric
    assert len(ax.lines) == 3
    for layer, line in enumerate(ax.lines):
        np.testing.assert_array_equal(line.get_xdata(), STEPS)
        np.testing.assert_array_equal(line.get_ydata(), values["kind=mha,rope_fraction=0.25", "qk_gram", metric][layer])


def test_perplexity_table_orders_variants(synthetic):
    _, trials, _ = synthetic
    table = plots.perplexity_table(trials.sample(frac=1.0, random_state=0))
    assert table["trial"].tolist() == ["kind=mha,rope_fraction=0.25", "kind=mha,rope_fraction=0.5",
                                       "kind=mha,remove_gap=True", "kind=mla_decoupled,rope_fraction=0.25"]
    assert table["eval_perplexity"].tolist() == [51.0, 50.0, 53.0, 52.0]
    assert {"eval_loss", "max_mp_gap", "mean_outlier_energy", "step"} <= set(table.columns)


def test_rank_collapse_figure_draws_the_rows():
    rows = rank_collapse.run([4, 8, 16], draws=2, seed=0)
    fig = plots.rank_collapse_figure(rows)
    bidirectional, causal, sigmas = fig.axes
    assert "setup=paper" in bidirectional.get_title()
    for ax, keys in ((bidirectional, ("sr_vanilla", "sr_centred")),
                     (causal, ("sr_causal", "sr_causal_centred", "sr_causal_scaled"))):
        plotted = [c.lines[0].get_ydata() for c in ax.containers]        # errorbars
        np.testing.assert_allclose(plotted, [[r[k] for r in rows] for k in keys])
    np.testing.assert_allclose(sigmas.lines[3].get_ydata(), [r["sigma2_causal"] for r in rows])


def test_activation_depth_figure_compares_remove_gap(synthetic):
    scalars, trials, values = synthetic
    fig = plots.activation_depth_figure(scalars, "rep_stable_rank", trials=trials)
    ax, = fig.axes
    bold = {l.get_label(): l.get_ydata() for l in ax.lines if not l.get_label().startswith("_")}
    vanilla = [t for t, (_, _, gap) in TRIALS.items() if not gap]
    assert set(bold) == {"vanilla (mean of 3)", "remove_gap (mean of 1)"}
    np.testing.assert_allclose(bold["vanilla (mean of 3)"],
                               np.mean([values[t, None, "rep_stable_rank"][:, -1] for t in vanilla], axis=0))
    np.testing.assert_allclose(bold["remove_gap (mean of 1)"],
                               values["kind=mha,remove_gap=True", None, "rep_stable_rank"][:, -1])
    only_vanilla = scalars[~scalars["trial"].str.contains("remove_gap")]
    ax, = plots.activation_depth_figure(only_vanilla).axes                # remove_gap from the names
    assert [l.get_label() for l in ax.lines if not l.get_label().startswith("_")] == ["vanilla (mean of 3)"]
    assert "no remove_gap trials" in " ".join(t.get_text() for t in ax.texts)


# The images written during training ----------------------------------------------------------------

def test_seed_and_difference_intervals_match_scipy(rng):
    """The report's intervals against scipy's own t-interval and Welch test, on fresh draws of
    unequal spread and size."""
    from scipy import stats
    for _ in range(5):
        a = rng.normal(1.0, rng.uniform(0.1, 3.0), rng.integers(2, 7))
        b = rng.normal(0.0, rng.uniform(0.1, 3.0), rng.integers(2, 7))
        mean, low, high, n = plots.seed_interval(a)
        ref = stats.t.interval(0.95, a.size - 1, loc=a.mean(), scale=stats.sem(a))
        assert n == a.size
        np.testing.assert_allclose([mean, low, high], [a.mean(), *ref], rtol=1e-9)
        diff, low, high = plots.difference_interval(a, b)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        np.testing.assert_allclose([diff, low, high], [a.mean() - b.mean(), ci.low, ci.high],
                                   rtol=1e-9)
    diff, low, high = plots.difference_interval([1.0, np.nan], [0.5, 0.7])   # one finite value
    assert diff == pytest.approx(0.4) and np.isnan(low) and np.isnan(high)
    assert all(np.isnan(plots.difference_interval([], [1.0, 2.0])))


def test_training_writes_esd_and_heatmap_images(tiny_sweep_workdir):
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    trials = ("kind=mha,rope_fraction=0.25", "kind=mla_decoupled,rope_fraction=0.5")
    for trial in trials:
        run_dir = tiny_sweep_workdir / trial
        spectral_steps = sorted(events.load_scalars(run_dir, prefix="spectral/qk_circuit_sum/mp_gap/layer_00")["step"])
        assert spectral_steps == [0, 5, 10, 15]
        images = {}
        for path in sorted(run_dir.glob(events.EVENTS_GLOB)):
            acc = event_accumulator.EventAccumulator(str(path), size_guidance={"images": 0})
            acc.Reload()
            images.update({tag: acc.Images(tag) for tag in acc.Tags()["images"]})
        branches = ["qk_circuit_content", "qk_circuit_rope", "qk_circuit_sum_content", "qk_circuit_sum_rope"]
        matrices = ["qk_circuit", "qk_circuit_sum"] + (branches if "decoupled" in trial else [])
        want = {f"spectral/{m}/esd/layer_{l:02d}" for m in matrices for l in range(4)} | \
            {f"spectral/{m}/{metric}_heatmap" for m in matrices for metric in ("mp_gap", "outlier_energy")}
        assert set(images) == want
        for tag, written in images.items():
            assert [e.step for e in written] == [0, 10], tag          # diagnostics.images_every
            pixels = np.asarray(Image.open(io.BytesIO(written[-1].encoded_image_string)).convert("RGB"))
            assert pixels.shape[:2] == (written[-1].height, written[-1].width) and pixels.std() > 10, tag
        # The heatmap grows: one more column of colour per spectra step.
        first, last = (np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
                       for e in (images["spectral/qk_circuit_sum/mp_gap_heatmap"][i] for i in (0, -1)))
        assert not np.array_equal(first, last)


def test_exported_scalars_read_back_as_the_workdir(tiny_sweep_workdir, tmp_path):
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "export_scalars.py"
    spec = importlib.util.spec_from_file_location("export_scalars", path)
    export_scalars = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_scalars)
    out = tmp_path / "scalars.json.gz"
    export_scalars.write(str(tiny_sweep_workdir), str(out))
    scalars, trials = events.load_export(out)
    want = events.load_scalars(tiny_sweep_workdir)
    assert len(scalars) > 100 and set(scalars["trial"]) == set(want["trial"])
    # The export keeps DIGITS significant digits: within half a unit of the last one.
    pd.testing.assert_frame_equal(scalars, want, check_exact=False,
                                  rtol=0.5 * 10.0 ** (1 - export_scalars.DIGITS))
    want_trials = events.trial_table(tiny_sweep_workdir)
    assert trials["trial"].tolist() == want_trials["trial"].tolist()
    pd.testing.assert_frame_equal(trials, want_trials[trials.columns.tolist()])
    both = events.load(out)
    pd.testing.assert_frame_equal(both[0], scalars)
    pd.testing.assert_frame_equal(both[1], trials)
