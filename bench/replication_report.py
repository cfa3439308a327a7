"""The tables and figures of REPRODUCTION.md from the exported scalars of a seeded sweep.

    python bench/replication_report.py results/replication_prose/scalars.json.gz \
        --out=results/replication_prose

Reads one or more exports of bench/export_scalars.py (parts of the same sweep are joined),
groups trials into variants (attention kind and rope_fraction, from each trial's config.json)
over seeds, and writes OUT/report.md (also printed), OUT/summary.csv (every number of the
tables) and OUT/figures/*.png (mla_rmt.plots seed bands). Matrix and metric names are read
from the tags, so any set of diagnostics reports. Intervals are 95% t-intervals over seeds.

- trials: final eval loss against the trial's best (within 2%: no sign of memorisation);
- eval perplexity per variant at matched tokens (the same steps for all trials);
- per matrix and primary metric, variant x layer at the last spectra step;
- the step-0 values (the initialisation, a null control) and the values at a matched eval
  loss (the worst final eval loss of all trials, reached by every trial; metrics interpolated
  linearly in step), as the mean over layers;
- OVER_STEPS as the mean over layers at steps 0, 50, 100, ... (every 100 after 200);
- the papers' comparisons between variants (CONTRASTS): the difference of the means over
  seeds with its 95% Welch interval, for the final perplexity and CONTRAST_METRICS.
"""
import argparse
import gzip
import json
import pathlib
import sys

import matplotlib
matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mla_rmt import plots, tags  # noqa: E402

PRIMARY = ("mp_gap", "outlier_count", "outlier_energy", "mp_soft_rank", "stable_rank_frac")
MEMORISATION_TOLERANCE = 0.02
KIND_ORDER = ("mha", "gqa", "mla_prerope", "mla_decoupled")
# The papers' comparisons (variant, baseline), and the layer-mean metrics compared at the last
# spectra step, besides the final eval perplexity.
CONTRASTS = (("mla_decoupled f=0.5", "mha f=0.5"), ("mla_prerope f=0.5", "mha f=0.5"),
             ("mla_decoupled f=0.5", "mla_prerope f=0.5"), ("mha f=0 (NoPE)", "mha f=0.5"),
             ("mla_decoupled f=0.25", "mla_decoupled f=0.5"),
             ("mla_decoupled f=0.75", "mla_decoupled f=0.5"))
# The one metric tabled over training (the others are in the figures).
OVER_STEPS = ("qk_circuit_sum", "mp_gap")
CONTRAST_METRICS = (("qk_circuit_sum", "mp_gap"), ("qk_circuit_sum", "outlier_energy"),
                    ("qk_circuit_sum", "stable_rank_frac"), ("qk_circuit", "mp_gap/head_mean"))


def load(paths: list[str]) -> dict:
    """{trial: export entry}; a later file wins a trial."""
    trials = {}
    for path in paths:
        with gzip.open(path, "rt") as f:
            trials.update(json.load(f))
    if not trials:
        raise SystemExit(f"no trials in {paths}")
    return trials


def variant_name(kind: str, fraction: float) -> str:
    return f"{kind} f={fraction:g}" + (" (NoPE)" if fraction == 0 else "")


def corpus_section(paths: list[pathlib.Path]) -> str:
    """The corpus table from bench/replication.py's corpus.*.json (every call's must agree)."""
    if not paths:
        return ""
    reports = [json.loads(p.read_text()) for p in paths]
    hashes = {r["tokenizer_sha256"] for r in reports}
    rows = [{"split": split, "corpus": name, **counts}
            for split, per_corpus in reports[0]["splits"].items() for name, counts in per_corpus.items()]
    for split, per_corpus in reports[0]["splits"].items():
        rows.append({"split": split, "corpus": "all",
                     **{k: sum(c[k] for c in per_corpus.values()) for k in rows[0] if k not in ("split", "corpus")}})
    r = reports[0]
    lines = ["## Corpus\n",
             f"config.data.corpora={r['corpora']!r}, {r['vocab_size']}-piece tokenizer (sha256 "
             f"{r['tokenizer_sha256'][:16]}...), {r['epoch_steps']} steps make one pass of the smallest "
             f"train shard. Documents are held out whole; records are blocks of a document; tokens "
             f"include one EOS per record. From {', '.join(p.name for p in paths)}.\n",
             markdown(pd.DataFrame(rows)), ""]
    if len(hashes) > 1:
        lines.insert(1, f"**The calls trained different tokenizers: {sorted(hashes)}.**\n")
    return "\n".join(lines)


def trial_table(trials: dict) -> pd.DataFrame:
    """One row per trial: kind, rope_fraction, seed, variant, tokens per step."""
    rows = []
    for name, run in trials.items():
        config = run.get("config.json")
        if not config:
            raise SystemExit(f"trial {name!r}: the export has no config.json")
        attention = config["model"]["attention"]
        rows.append({"trial": name, "kind": attention["kind"],
                     "rope_fraction": float(attention["rope_fraction"]), "seed": int(config["seed"]),
                     "tokens_per_step": config["data"]["global_batch_size"] * config["data"]["seq_len"]})
    table = pd.DataFrame(rows)
    table["variant"] = [variant_name(k, f) for k, f in zip(table["kind"], table["rope_fraction"])]
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    table["_order"] = [(rank.get(k, len(rank)), k, -f if f > 0 else 1.0)
                       for k, f in zip(table["kind"], table["rope_fraction"])]
    table = table.sort_values(["_order", "seed"]).drop(columns="_order").reset_index(drop=True)
    return table


def scalars_table(trials: dict, table: pd.DataFrame) -> pd.DataFrame:
    """Long rows: trial, variant, seed, matrix, metric, layer (-1: not per layer), step, value.
    Per-layer tags (mla_rmt/tags.py) keep a per-head matrix's reduction in the metric
    ("mp_gap/head_max")."""
    info = table.set_index("trial")
    frames = []
    for name, run in trials.items():
        for tag, points in run["scalars"].items():
            parsed = tags.parse(tag)
            kind = parsed.kind if parsed else None
            if kind in ("spectral", "activations"):
                matrix = parsed.matrix or "activations"
                metric = parsed.metric + (f"/{parsed.heads}" if parsed.heads else "")
                layer = parsed.layer
            elif kind in ("eval", "train"):
                matrix, metric, layer = "", tag, -1
            else:
                continue
            frame = pd.DataFrame(points, columns=["step", "value"])
            frame["trial"], frame["matrix"], frame["metric"], frame["layer"] = name, matrix, metric, layer
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["variant"] = out["trial"].map(info["variant"])
    out["seed"] = out["trial"].map(info["seed"])
    return out


def is_primary(matrix: str, metric: str) -> bool:
    return matrix == "activations" or any(p in metric for p in PRIMARY)


def cell(mean, low, high, n, fmt="{:.3g}") -> str:
    if not np.isfinite(mean):
        return "-"
    if n < 2:
        return fmt.format(mean) + " (n=1)"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |"
                              for row in frame.itertuples(index=False)])


def memorisation(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per trial: final and best eval loss; within MEMORISATION_TOLERANCE of the best?"""
    out = []
    for t in table.itertuples():
        ev = rows[(rows["trial"] == t.trial) & (rows["metric"] == "eval/loss")].sort_values("step")
        if ev.empty:
            continue
        final, best = ev.iloc[-1], ev.loc[ev["value"].idxmin()]
        excess = final["value"] / best["value"] - 1
        out.append({"trial": t.trial, "variant": t.variant, "seed": t.seed,
                    "final step": int(final["step"]), "tokens": int(final["step"]) * t.tokens_per_step,
                    "final eval loss": round(final["value"], 4), "best": round(best["value"], 4),
                    "best at": int(best["step"]), "final/best - 1": f"{100 * excess:.2f}%",
                    "within 2%": "yes" if excess <= MEMORISATION_TOLERANCE else "NO"})
    return pd.DataFrame(out)


def common_steps(rows: pd.DataFrame) -> list[int]:
    """Steps that every trial logged for these rows."""
    per_trial = rows.groupby("trial")["step"].apply(set)
    return sorted(set.intersection(*per_trial)) if len(per_trial) else []


def per_variant(values: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """values: rows (variant, seed, *keys, value) -> (variant, *keys, mean, low, high, n)."""
    rows = []
    for key, group in values.groupby(["variant", *keys], sort=False):
        rows.append((*key, *plots.seed_interval(group["value"])))
    return pd.DataFrame(rows, columns=["variant", *keys, "mean", "low", "high", "n"])


def wide(stats: pd.DataFrame, index: str, columns: str, order: list[str], fmt="{:.3g}") -> pd.DataFrame:
    """mean [low, high] cells, one row per `index` value (in `order`), one column per `columns`."""
    stats = stats.assign(cell=[cell(r.mean, r.low, r.high, r.n, fmt) for r in stats.itertuples()])
    table = stats.pivot(index=index, columns=columns, values="cell")
    table = table.reindex([o for o in order if o in table.index])
    table = table[list(dict.fromkeys(stats[columns]))]        # columns in the order computed
    return table.reset_index()


def interpolate_at(curve: pd.DataFrame, step: float) -> float:
    curve = curve.sort_values("step")
    return float(np.interp(step, curve["step"], curve["value"]))


def matched_loss_steps(rows: pd.DataFrame, target: float) -> dict[str, float]:
    """Per trial: the first (interpolated) step where eval loss reaches target."""
    out = {}
    for trial, ev in rows[rows["metric"] == "eval/loss"].groupby("trial"):
        ev = ev.sort_values("step")
        steps, loss = ev["step"].to_numpy(float), ev["value"].to_numpy()
        hit = np.flatnonzero(loss <= target)
        if not hit.size:
            continue
        i = hit[0]
        if i == 0:
            out[trial] = steps[0]
        else:                                   # linear between the two evals around the crossing
            w = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
            out[trial] = steps[i - 1] + w * (steps[i] - steps[i - 1])
    return out


def contrasts(final: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """final: column name -> rows (variant, seed, value) -> one row per CONTRASTS pair present,
    'difference [low, high]' per column, and the long form for summary.csv."""
    cells, long = [], []
    for a, b in CONTRASTS:
        row = {"difference": f"{a} − {b}"}
        for name, values in final.items():
            va, vb = (values.loc[values["variant"] == v, "value"] for v in (a, b))
            if va.empty or vb.empty:
                continue
            diff, low, high = plots.difference_interval(va, vb)
            row[name] = cell(diff, low, high, min(len(va), len(vb)))
            long.append({"variant": f"{a} - {b}", "metric": name, "mean": diff, "low": low,
                         "high": high, "n": min(len(va), len(vb))})
        if len(row) > 1:
            cells.append(row)
    return pd.DataFrame(cells), pd.DataFrame(long)


def report(rows: pd.DataFrame, table: pd.DataFrame, figures: pathlib.Path) -> tuple[str, pd.DataFrame]:
    order = list(dict.fromkeys(table["variant"]))
    md, summary = [], []
    seeds = table.groupby("variant")["seed"].apply(lambda s: ",".join(map(str, sorted(s))))
    md += ["## Trials and the memorisation check\n",
           f"{len(table)} trials, {len(order)} variants; seeds per variant: "
           + "; ".join(f"{v}: {seeds[v]}" for v in order) + "\n",
           markdown(memorisation(rows, table)), ""]

    # Eval perplexity at matched tokens.
    ev = rows[rows["metric"] == "eval/loss"]
    steps = common_steps(ev)
    if steps:
        picks = sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[3 * len(steps) // 4], steps[-1]})
        ppl = ev[ev["step"].isin(picks)].assign(value=lambda f: np.exp(f["value"]))
        stats = per_variant(ppl, ["step"])
        tokens = table["tokens_per_step"].iloc[0]
        stats["step"] = [f"ppl @{s} ({s * tokens / 1e6:.2f}M tok)" for s in stats["step"]]
        md += ["## Eval perplexity at matched tokens (mean [95% interval] over seeds)\n",
               markdown(wide(stats, "variant", "step", order, "{:.2f}")), ""]
        summary.append(stats.assign(matrix="", metric="eval/perplexity", layer="", when=stats["step"]))
        fig = plots.seed_band_figure(ev, "step", ylabel="eval loss (nats)", order=order,
                                     title="Eval loss over training")
        fig.savefig(figures / "eval_loss.png", dpi=80)

    # Matched eval loss: the worst final eval loss, which every trial reaches.
    finals = ev.sort_values("step").groupby("trial")["value"].last()
    target = float(finals.max()) if len(finals) else np.nan
    matched = matched_loss_steps(rows, target) if np.isfinite(target) else {}

    per_layer = rows[rows["layer"] >= 0]
    layer_means = (per_layer.groupby(["trial", "variant", "seed", "matrix", "metric", "step"],
                                     as_index=False)["value"].mean())
    md += [f"## Spectra at step 0 (initialisation: the null control), at the matched eval loss "
           f"{target:.4f} and at the last step; mean over layers\n"]
    for (matrix, metric), group in layer_means.groupby(["matrix", "metric"], sort=True):
        if not is_primary(matrix, metric):
            continue
        last = common_steps(group)
        if not last:
            continue
        first = "init, step 0" if last[0] == 0 else f"first, step {last[0]}"
        at = {"first": group[group["step"] == last[0]].assign(when=first),
              "last": group[group["step"] == last[-1]].assign(when=f"last, step {last[-1]}")}
        if matched:
            vals = [{"variant": v, "seed": s, "value": interpolate_at(g, matched[t]),
                     "when": "matched loss"}
                    for (t, v, s), g in group.groupby(["trial", "variant", "seed"]) if t in matched]
            at = {"first": at["first"], "matched": pd.DataFrame(vals), "last": at["last"]}
        stats = pd.concat([per_variant(frame, ["when"]) for frame in at.values()], ignore_index=True)
        stats = stats.assign(matrix=matrix, metric=metric, layer="mean")
        summary.append(stats)
        md += [f"### {matrix}: {metric} (layer mean)\n",
               markdown(wide(stats, "variant", "when", order)), ""]

    def layer_mean(matrix, metric):
        return layer_means[(layer_means["matrix"] == matrix) & (layer_means["metric"] == metric)]

    matrix, metric = OVER_STEPS
    group = layer_mean(matrix, metric)
    picks = [s for s in common_steps(group) if s <= 200 or s % 100 == 0]
    if picks:
        stats = per_variant(group[group["step"].isin(picks)], ["step"])
        summary.append(stats.assign(matrix=matrix, metric=metric, layer="mean",
                                    when=[f"step {s}" for s in stats["step"]]))
        stats["step"] = [f"@{s}" for s in stats["step"]]
        md += [f"## {matrix}: {metric} over training (layer mean; mean [95% interval] over seeds)\n",
               markdown(wide(stats, "variant", "step", order)), ""]

    final = {}
    if steps:
        final["eval ppl, last"] = ev[ev["step"] == steps[-1]].assign(value=lambda f: np.exp(f["value"]))
    for matrix, metric in CONTRAST_METRICS:
        group = layer_mean(matrix, metric)
        if last := common_steps(group):
            final[f"{matrix} {metric}, step {last[-1]}"] = group[group["step"] == last[-1]]
    diffs, long = contrasts(final)
    if not diffs.empty:
        md += ["## Differences between variants (difference of the means [95% Welch interval] "
               "over seeds; layer means)\n", markdown(diffs), ""]
        summary.append(long.assign(matrix="contrast", layer="mean", when="last"))

    md += ["## By layer at the last spectra step (mean [95% interval] over seeds)\n"]
    spectra_figs = {}
    for (matrix, metric), group in per_layer.groupby(["matrix", "metric"], sort=True):
        if not is_primary(matrix, metric):
            continue
        steps_all = common_steps(group)
        if not steps_all:
            continue
        final = group[group["step"] == steps_all[-1]]
        stats = per_variant(final, ["layer"])
        summary.append(stats.assign(matrix=matrix, metric=metric, when=f"step {steps_all[-1]}"))
        stats["layer"] = [f"L{l:02d}" for l in stats["layer"]]
        md += [f"### {matrix}: {metric}, step {steps_all[-1]}\n",
               markdown(wide(stats, "variant", "layer", order)), ""]
        spectra_figs.setdefault(matrix, []).append(final)
    for matrix, frames in spectra_figs.items():
        frame = pd.concat(frames)
        fig = plots.seed_band_figure(frame, "layer", panel="metric", ncols=3, order=order,
                                     title=f"{matrix} by layer at the last step")
        fig.savefig(figures / f"{matrix}_by_layer.png", dpi=80)
        means = layer_means[(layer_means["matrix"] == matrix)
                            & layer_means["metric"].isin(frame["metric"].unique())]
        fig = plots.seed_band_figure(means, "step", panel="metric", ncols=3, order=order,
                                     title=f"{matrix} over training (mean over layers)")
        fig.savefig(figures / f"{matrix}_over_steps.png", dpi=80)
    columns = ["variant", "matrix", "metric", "layer", "when", "mean", "low", "high", "n"]
    summary_frame = pd.concat([s.reindex(columns=columns) for s in summary], ignore_index=True)
    return "\n".join(md), summary_frame


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="scalars*.json.gz of bench/export_scalars.py")
    parser.add_argument("--out", required=True, help="directory for report.md, summary.csv, figures/")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    trials = load(args.exports)
    table = trial_table(trials)
    rows = scalars_table(trials, table)
    text, summary = report(rows, table, figures)
    corpus = sorted({p for e in args.exports for p in pathlib.Path(e).parent.glob("corpus*.json")})
    text = corpus_section(corpus) + "\n" + text
    header = (f"<!-- python bench/replication_report.py {' '.join(args.exports)} --out={args.out} -->\n\n")
    (out / "report.md").write_text(header + text + "\n")
    summary.to_csv(out / "summary.csv", index=False)
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'summary.csv'}, {len(list(figures.glob('*.png')))} "
          f"figures in {figures}", file=sys.stderr)


if __name__ == "__main__":
    main()
