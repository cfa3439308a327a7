"""The TensorBoard tag schema: format -> parse round trips on fresh random names, the strings
that event files already hold, and every tag a real training run writes."""
import gzip
import json
import pathlib
import string

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mla_rmt import tags

REPO = pathlib.Path(__file__).resolve().parents[1]
RESERVED = {"eigenvalues", "esd", *tags.HEAD_REDUCTIONS}
CHARS = np.array(list(string.ascii_letters + string.digits + "_.+-"))


def _names(rng, n):
    out = []
    while len(out) < n:
        name = "".join(rng.choice(CHARS, size=rng.integers(1, 16)))
        if name not in RESERVED and not name.endswith("_heatmap"):
            out.append(name)
    return out


def _formatted(rng):
    """(tag, expected parse) for every tag kind, on fresh random names and layers."""
    matrix, metric = _names(rng, 2)
    layer = int(rng.integers(0, 250))
    heads = tags.HEAD_REDUCTIONS[rng.integers(2)]
    reduction = tags.OVER_LAYERS[rng.integers(2)]
    return [
        (tags.spectral(matrix, metric, layer), tags.Tag("spectral", matrix, metric, layer=layer)),
        (tags.spectral(matrix, metric, layer, heads), tags.Tag("spectral", matrix, metric, heads, layer)),
        (tags.spectral_over_layers(matrix, metric, reduction),
         tags.Tag("spectral_over_layers", matrix, metric, reduction=reduction)),
        (tags.spectral_over_layers(matrix, metric, reduction, heads),
         tags.Tag("spectral_over_layers", matrix, metric, heads, reduction=reduction)),
        (tags.eigenvalues(matrix, layer), tags.Tag("eigenvalues", matrix, layer=layer)),
        (tags.esd(matrix, layer), tags.Tag("esd", matrix, layer=layer)),
        (tags.heatmap(matrix, metric), tags.Tag("heatmap", matrix, metric)),
        (tags.activations(metric, layer), tags.Tag("activations", metric=metric, layer=layer)),
        (tags.tail_fit(matrix, metric, layer), tags.Tag("tail_fit", matrix, metric, layer=layer)),
        (tags.final(metric), tags.Tag("final", metric=metric)),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_every_kind_of_tag_parses_back_to_what_formatted_it(seed):
    rng = np.random.default_rng([seed, 7])
    formatted = _formatted(rng)
    assert {t.kind for _, t in formatted} == {k for k, _ in tags._PATTERNS} - {
        "train", "eval", "perf", "config", "hparams"}
    for tag, expected in formatted:
        assert tags.parse(tag) == expected, tag
    assert len({tag for tag, _ in formatted}) == len(formatted)


def test_the_fixed_names_parse_to_their_kind():
    for kind, names in (("train", (tags.TRAIN_LOSS, tags.TRAIN_GRAD_NORM, tags.TRAIN_LEARNING_RATE)),
                        ("eval", (tags.EVAL_LOSS, tags.EVAL_PERPLEXITY)),
                        ("perf", (tags.PERF_TOKENS_PER_SEC, tags.PERF_STEP_TIME_SEC, tags.PERF_MFU)),
                        ("config", (tags.CONFIG,))):
        for name in names:
            assert tags.parse(name).kind == kind, name


def test_the_strings_are_those_event_files_already_hold():
    assert tags.spectral("qk_circuit_sum", "mp_gap", 3) == "spectral/qk_circuit_sum/mp_gap/layer_03"
    assert tags.spectral("qk_circuit", "mp_gap", 11, "head_max") == "spectral/qk_circuit/mp_gap/head_max/layer_11"
    assert tags.spectral_over_layers("qk_circuit", "mp_gap", "max", "head_max") == \
        "spectral/qk_circuit/mp_gap/head_max/max"
    assert tags.spectral_over_layers("qk_circuit_sum", "outlier_energy", "mean") == \
        "spectral/qk_circuit_sum/outlier_energy/mean"
    assert tags.eigenvalues("qk_gram", 0) == "spectral/qk_gram/eigenvalues/layer_00"
    assert tags.esd("qk_gram", 7) == "spectral/qk_gram/esd/layer_07"
    assert tags.heatmap("qk_circuit_sum", "mp_gap") == "spectral/qk_circuit_sum/mp_gap_heatmap"
    assert tags.activations("attn_entropy_bits", 2) == "activations/attn_entropy_bits/layer_02"
    assert tags.tail_fit("qk_circuit", "alpha", 1) == "tail_fit/qk_circuit/alpha/layer_01"
    assert tags.final("eval_loss") == "final/eval_loss"


def test_an_export_written_before_parses_whole():
    """The committed replication export (per-head layer tags without a heads part)."""
    with gzip.open(REPO / "results/replication/scalars.json.gz", "rt") as f:
        exported = json.load(f)
    names = {tag for run in exported.values() for tag in run["scalars"]}
    unparsed = sorted(t for t in names if tags.parse(t) is None)
    assert not unparsed, unparsed[:10]
    per_head = tags.parse("spectral/qk_circuit/mp_gap/layer_03")
    assert per_head == tags.Tag("spectral", "qk_circuit", "mp_gap", None, 3)


@pytest.mark.parametrize("tag", ["spectral/qk", "spectral/a/b/head_min/layer_01", "spectral/a/b/layer_x",
                                 "spectral/a/b/c/d/layer_01", "activations/a/b/layer_01", "train/a/b",
                                 "other/loss", "spectral/a/b/head_max/median", ""])
def test_a_tag_outside_the_schema_parses_to_none(tag):
    assert tags.parse(tag) is None


@pytest.mark.parametrize("call", [lambda: tags.spectral("a/b", "m", 0), lambda: tags.spectral("a", "", 0),
                                  lambda: tags.spectral("a", "esd", 0), lambda: tags.heatmap("a", "x_heatmap"),
                                  lambda: tags.spectral("a", "m", 0, "head_min"),
                                  lambda: tags.spectral_over_layers("a", "m", "median"),
                                  lambda: tags.activations("m", -1), lambda: tags.activations("eigenvalues", 1)])
def test_a_name_that_would_not_parse_back_is_refused(call):
    with pytest.raises(ValueError, match="tag "):
        call()


def _written_tags(run_dir: pathlib.Path) -> set[str]:
    """Every tag of every summary in the run's event files: scalars, histograms, images, text,
    HParams entries."""
    out = set()
    for path in run_dir.glob("events.out.tfevents.*"):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            out.update(value.tag for value in event.summary.value)
    return out


def test_every_tag_a_training_run_writes_parses(tiny_sweep_workdir):
    written = set()
    runs = [p for p in tiny_sweep_workdir.iterdir() if p.is_dir()]
    assert runs
    for run_dir in runs:
        found = _written_tags(run_dir)
        assert found, run_dir
        written |= found
    unparsed = sorted(t for t in written if tags.parse(t) is None)
    assert not unparsed, unparsed[:10]
    kinds = {tags.parse(t).kind for t in written}
    assert kinds >= {"spectral", "spectral_over_layers", "eigenvalues", "esd", "heatmap", "activations",
                     "train", "eval", "perf", "final", "config", "hparams"}, kinds
