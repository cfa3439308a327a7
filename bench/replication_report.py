"""The tables and figures of REPRODUCTION.md from a sweep's exported scalars.

    python bench/replication_report.py results/replication/scalars.json.gz results/replication

Prints markdown tables (per trial: eval curve, the largest mp_gap and where, outlier_energy and
stable rank by layer at the last spectra step) and writes PNG figures drawn by mla_rmt.plots.
"""
import pathlib
import sys

import matplotlib
matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mla_rmt import events, plots  # noqa: E402

MATRICES = ("qk_gram", "qk_circuit", "qk_gram_content", "qk_gram_rope")


def short(trial: str) -> str:
    return trial.replace("kind=", "").replace(",rope_fraction=", " f=")


def markdown(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    cells = [[floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row]
             for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def eval_curves(scalars: pd.DataFrame) -> pd.DataFrame:
    rows = scalars[scalars["tag"] == "eval/perplexity"]
    table = rows.pivot_table(index="trial", columns="step", values="value").rename(index=short)
    table.columns = [f"ppl @{c}" for c in table.columns]
    return table.reset_index()


def largest_gaps(scalars: pd.DataFrame) -> pd.DataFrame:
    """Per trial and matrix: the largest per-layer mp_gap over training (layer, step) and the
    largest at the last step."""
    out = []
    for matrix in MATRICES:
        for trial, table in events.layer_values(scalars, "mp_gap", matrix).items():
            layer, step = np.unravel_index(np.nanargmax(table.to_numpy()), table.shape)
            last = table.iloc[:, -1]
            out.append({"trial": short(trial), "matrix": matrix,
                        "max mp_gap": table.to_numpy()[layer, step],
                        "layer": int(table.index[layer]), "at step": int(table.columns[step]),
                        f"max @{int(table.columns[-1])}": last.max(),
                        "its layer": int(last.idxmax())})
    return pd.DataFrame(out).sort_values(["matrix", "trial"], key=lambda c: c.map(
        {m: i for i, m in enumerate(MATRICES)}) if c.name == "matrix" else c)


def by_layer(scalars: pd.DataFrame, metric: str, matrix: str | None) -> pd.DataFrame:
    """[trial x layer] of a per-layer metric at each trial's last logged step."""
    per_trial = events.layer_values(scalars, metric, matrix)
    table = pd.DataFrame({short(t): v.iloc[:, -1] for t, v in per_trial.items()}).T
    table.columns = [f"L{c}" for c in table.columns]
    return table.reset_index(names="trial")


def main():
    export, out_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    scalars, trials = events.load_export(export)
    pd.set_option("display.width", 250)

    print("## Eval perplexity\n")
    print(markdown(eval_curves(scalars), "{:.1f}"))
    print("\n## Largest mp_gap\n")
    print(markdown(largest_gaps(scalars)))
    for metric, matrix in [("mp_gap", "qk_gram"), ("outlier_energy", "qk_gram"),
                           ("stable_rank", "qk_gram"), ("stable_rank_frac", "qk_gram"),
                           ("outlier_energy", "qk_gram_rope"), ("outlier_energy", "qk_gram_content"),
                           ("mp_gap", "qk_circuit"),
                           ("rep_stable_rank", None), ("attn_sigma_ratio", None),
                           ("attn_entropy_bits", None)]:
        print(f"\n## {matrix or 'activations'}: {metric} by layer at the last step\n")
        print(markdown(by_layer(scalars, metric, matrix)))

    drawn = {
        "mp_gap_heatmaps.png": plots.mp_gap_heatmaps(scalars, ncols=3),
        "outlier_energy_heatmaps.png": plots.mp_gap_heatmaps(scalars, metric="outlier_energy", ncols=3),
        "outlier_energy_violins.png": plots.outlier_energy_violins(scalars, trials, min_step=100),
        "stable_rank_curves.png": plots.stable_rank_curves(scalars, ncols=3),
        "stable_rank_frac_curves.png": plots.stable_rank_curves(scalars, metric="stable_rank_frac", ncols=3),
        "qk_gram_rope_mp_gap_heatmaps.png": plots.mp_gap_heatmaps(scalars, matrix="qk_gram_rope", ncols=3),
        "rep_stable_rank_by_depth.png": plots.activation_depth_figure(scalars, trials=trials),
    }
    for name, fig in drawn.items():
        fig.savefig(figures / name, dpi=80)
        print(f"wrote {figures / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
