"""A workdir's TensorBoard event files and trial results as pandas tables, for notebooks.

A workdir is one run (event files in it) or a sweep (one run directory per trial, named by its
swept values, e.g. `kind=mha,rope_fraction=0.25`, holding `config.json` and, once finished,
`result.json`). Trials are named by their directory relative to the workdir.
"""
import gzip
import json
import pathlib

import numpy as np
import pandas as pd

from mla_rmt import dotted, tags

EVENTS_GLOB = "events.out.tfevents.*"


def _trial_name(run_dir: pathlib.Path, workdir: pathlib.Path) -> str:
    rel = run_dir.relative_to(workdir)
    return workdir.name if rel == pathlib.Path(".") else rel.as_posix()


def run_dirs(workdir) -> dict[str, pathlib.Path]:
    """{trial: run directory} for every directory under workdir holding event files, or a
    config.json / result.json (a trial that has not written events yet still gets a row)."""
    workdir = pathlib.Path(workdir)
    found = {p.parent for p in workdir.rglob(EVENTS_GLOB)}
    found |= {p.parent for name in ("config.json", "result.json") for p in workdir.rglob(name)}
    found = {d for d in found if "checkpoints" not in d.relative_to(workdir).parts}
    return {_trial_name(d, workdir): d for d in sorted(found)}


def read_run(run_dir: pathlib.Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the run's event files, oldest file first."""
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
    rows = []
    for path in sorted(run_dir.glob(EVENTS_GLOB)):   # file names start with the creation time
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={"scalars": 0, "histograms": 1, "images": 1, "tensors": 1,
                                      "distributions": 1, "audio": 1, "compressedHistograms": 1})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            rows.extend((tag, int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return rows


def _no_scalars() -> pd.DataFrame:
    return pd.DataFrame({"trial": pd.Series(dtype=object), "tag": pd.Series(dtype=object),
                         "step": pd.Series(dtype=np.int64), "value": pd.Series(dtype=np.float64)})


def load_scalars(workdir, prefix: str = "") -> pd.DataFrame:
    """Every scalar of every trial: DataFrame[trial, tag, step, value], sorted.

    A step logged twice (a trial resumed from an earlier checkpoint re-logs the steps after
    it) keeps its last value. `prefix` keeps only tags starting with it.
    """
    frames = []
    for trial, run_dir in run_dirs(workdir).items():
        rows = [r for r in read_run(run_dir) if r[0].startswith(prefix)]
        if rows:
            frame = pd.DataFrame(rows, columns=["tag", "step", "value"])
            frame.insert(0, "trial", trial)
            frames.append(frame)
    if not frames:
        return _no_scalars()
    out = pd.concat(frames, ignore_index=True)
    out = out.drop_duplicates(["trial", "tag", "step"], keep="last")
    return out.sort_values(["trial", "tag", "step"], ignore_index=True)


def parse_layer_tags(scalars: pd.DataFrame) -> pd.DataFrame:
    """The per-layer rows of load_scalars with the tag split into columns: family ('spectral' or
    'activations'), matrix (None for activations), metric, heads ('head_mean' / 'head_max' for
    a per-head matrix, else None) and layer (int). Other tags (train/..., eval/...,
    spectral/.../mean) are dropped."""
    names = pd.Series(scalars["tag"].unique(), dtype=object)
    parsed = {}
    for tag in names:
        parts = tags.parse(tag)
        if parts is not None and parts.kind in ("spectral", "activations"):
            parsed[tag] = (parts.kind, parts.matrix, parts.metric, parts.heads, parts.layer)
    keep = scalars[scalars["tag"].isin(list(parsed))].reset_index(drop=True)
    parts = pd.DataFrame([parsed[t] for t in keep["tag"]],
                         columns=["family", "matrix", "metric", "heads", "layer"], index=keep.index)
    if keep.empty:
        parts = parts.astype({"layer": np.int64})
    return pd.concat([keep, parts], axis=1)


def layer_values(scalars: pd.DataFrame, metric: str, matrix: str | None = None,
                 heads: str | None = None) -> dict[str, pd.DataFrame]:
    """{trial: DataFrame [layer x step]} of one per-layer metric (matrix=None: activations).

    A per-head matrix (e.g. qk_circuit) logs two values per layer: pass heads='head_mean' or
    'head_max'. A per-layer matrix (and exports written before head reductions had their own
    tags, whose qk_circuit layer values are head means) has heads=None.
    """
    if heads is not None and heads not in tags.HEAD_REDUCTIONS:
        raise ValueError(f"heads={heads!r}: one of {tags.HEAD_REDUCTIONS} or None")
    rows = parse_layer_tags(scalars)
    family = "activations" if matrix is None else "spectral"
    rows = rows[(rows["family"] == family) & (rows["metric"] == metric)]
    if matrix is not None:
        rows = rows[rows["matrix"] == matrix]
        found = set(rows["heads"].dropna())
        if found and heads is None:
            raise ValueError(f"spectral/{matrix}/{metric} is per head: pass heads= one of {sorted(found)}")
    rows = rows[rows["heads"].isna()] if heads is None else rows[rows["heads"] == heads]
    return {trial: group.pivot_table(index="layer", columns="step", values="value", aggfunc="last")
            for trial, group in rows.groupby("trial", sort=True)}


def value_from_name(trial: str, column: str):
    """A swept value from a trial directory name like 'kind=mha,rope_fraction=0.25'."""
    for part in pathlib.PurePosixPath(trial).name.split(","):
        key, _, value = part.partition("=")
        if key == column and value:
            if column == "remove_gap":
                return value == "True"
            if column == "rope_fraction":
                return float(value)
            return value
    return None


def _trial_row(trial: str, config: dict, result: dict | None) -> dict:
    row = {"trial": trial}
    for column, field in tags.SWEPT.items():
        value = dotted.get(config, field, None)
        row[column] = value_from_name(trial, column) if value is None else value
    row["remove_gap"] = bool(row["remove_gap"]) if row["remove_gap"] is not None else False
    if row["rope_fraction"] is not None:
        row["rope_fraction"] = float(row["rope_fraction"])
    row["finished"] = result is not None
    row.update(result or {})
    return row


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=None if rows else ["trial", *tags.SWEPT, "finished"])


def trial_table(workdir) -> pd.DataFrame:
    """One row per trial: trial, kind, rope_fraction, remove_gap (from config.json, else the
    directory name), finished, then the final metrics of result.json (step, eval/perplexity,
    ...; NaN while a trial is unfinished)."""
    rows = []
    for trial, run_dir in run_dirs(workdir).items():
        config_path, result_path = run_dir / "config.json", run_dir / "result.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        rows.append(_trial_row(trial, config, result))
    return _table(rows)


def load_export(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scalars, trials) from a file of `bench/export_scalars.py`: what load_scalars and
    trial_table give for the workdir it was made from, without its (large) event files."""
    with gzip.open(path, "rt") as f:
        exported = json.load(f)
    rows, names, points = [], [], []     # one frame at the end: a frame per tag is slow
    for trial, run in sorted(exported.items()):
        rows.append(_trial_row(trial, run.get("config.json", {}), run.get("result.json")))
        for tag, tag_points in run["scalars"].items():
            names.append((trial, tag))
            points.append(np.asarray(tag_points, np.float64).reshape(-1, 2))
    if not names:
        return _no_scalars(), _table(rows)
    counts = [len(p) for p in points]
    step_value = np.concatenate(points)
    scalars = pd.DataFrame({"trial": np.repeat([t for t, _ in names], counts).astype(object),
                            "tag": np.repeat([g for _, g in names], counts).astype(object),
                            "step": step_value[:, 0].astype(np.int64), "value": step_value[:, 1]})
    return scalars.sort_values(["trial", "tag", "step"], ignore_index=True), _table(rows)


def load(source) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scalars, trials) of a workdir, or of a `.json.gz` file of `bench/export_scalars.py`."""
    if str(source).endswith(".json.gz"):
        return load_export(source)
    return load_scalars(source), trial_table(source)
