"""Figures of the spectral and activation diagnostics, from arrays or the tables of `events`.

Every function returns a matplotlib Figure on its own Agg canvas, outside pyplot: figures made
inside the training loop are never registered anywhere (nothing to close, no GUI, collected like
any object), and a notebook shows them as a cell's value (after `%matplotlib inline`). No file IO.
"""
import math

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mla_rmt import events, hparams, spectral

# Attention kinds in the order the sweeps read them (others follow, alphabetically).
KIND_ORDER = ("mha", "gqa", "mla_prerope", "mla_decoupled")
_GROUP_STYLE = {False: ("tab:blue", "vanilla"), True: ("tab:orange", "remove_gap")}


def _figure(nrows=1, ncols=1, panel=(4.0, 3.0), dpi=100, layout="constrained", **subplot_kw):
    """A Figure on an Agg canvas and its [nrows, ncols] axes."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)


def _single(panel, dpi, right=0.96):
    """One axes with fixed margins: the figures drawn while training skip the layout solver
    (which costs as much as the drawing)."""
    fig, axes = _figure(panel=panel, dpi=dpi, layout=None)
    fig.subplots_adjust(left=0.15, right=right, bottom=0.14, top=0.9)
    return fig, axes[0, 0]


def _grid(n: int, ncols: int, **kw):
    """n panels on a grid of at most ncols columns; the unused cells are removed."""
    ncols = max(1, min(ncols, n))
    fig, axes = _figure(math.ceil(n / ncols), ncols, **kw)
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, list(axes.flat[:n])


def figure_to_image(fig: Figure) -> np.ndarray:
    """The rendered figure as [H, W, 3] uint8 RGB (for TensorBoard images)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def _density_gammas(law: spectral.NullLaw, gammas):
    """Which gammas drew `law`: the full chain (null='product') or its first (null='mp').
    The law itself keeps only its edge and median, so the density needs the chain besides."""
    if gammas is None:
        return None
    chain = tuple(float(g) for g in gammas)
    for candidate in (chain, chain[:1]):
        if candidate and math.isclose(spectral.null_edge(candidate), law.edge, rel_tol=1e-6):
            return candidate
    raise ValueError(f"esd_figure: gammas {chain} give neither this null law's edge {law.edge:.6g} "
                     f"(null='product') nor, from gammas[:1], the null='mp' one")


def esd_figure(eigs_P, law: spectral.NullLaw, lambda_plus, title: str, gammas=None,
               bins: int = 60, panel=(5.0, 3.5), dpi=100) -> Figure:
    """Histogram (density) of one layer's eigenvalues against the null law, lambda_plus marked.

    As in spectral.mp_metrics, lambda_plus = s * law.edge with s = median(lambda) / law.median
    the bulk scale, so the null density in lambda is rho(lambda / s) / s, rho in units of the
    null mean. Per-head matrices: pass eigs [H, p] and lambda_plus [H]; the heads are pooled
    and the null is the mixture of the heads' scaled densities (each head has its own scale),
    the line marks the mean lambda_plus (the logged per-layer scalar), a band its range.
    `gammas` (e.g. diagnostics.Matrix.gammas) gives the density; a sampled null law
    (gammas None) has an edge and a median only, so the null bulk [0, lambda_plus] is shaded.
    """
    lam_plus_H = np.atleast_1d(np.asarray(lambda_plus, np.float64))
    eigs = np.asarray(eigs_P, np.float64)
    if lam_plus_H.size > 1 and (eigs.ndim != 2 or eigs.shape[0] != lam_plus_H.size):
        raise ValueError(f"esd_figure: per-head lambda_plus {lam_plus_H.shape} needs eigs [H, p], "
                         f"got {eigs.shape}")
    eigs = eigs.ravel()
    lam_plus = float(lam_plus_H.mean())
    fig, ax = _single(panel, dpi)
    top = 1.05 * max(float(eigs.max(initial=0.0)), float(lam_plus_H.max()), 1e-30)
    bins = int(np.clip(2 * np.sqrt(eigs.size), 10, bins))   # few values: few, readable bins
    heights, _, _ = ax.hist(eigs, bins=np.linspace(0.0, top, bins + 1), density=True,
                            color="0.6", label=f"ESD ({eigs.size} values)")
    density_gammas = _density_gammas(law, gammas)
    scales_H = lam_plus_H / law.edge
    if density_gammas is None:
        ax.axvspan(0.0, lam_plus, color="tab:blue", alpha=0.08, label="null bulk (sampled law)")
    elif np.all(scales_H > 0):      # (a zero spectrum has no bulk to draw)
        x = np.linspace(0.0, top, 800)[1:]
        rho = np.mean([spectral.null_density(density_gammas, x / s) / s for s in scales_H], axis=0)
        ax.plot(x, rho, color="tab:blue", lw=1.5, label="null density")
    if lam_plus_H.size > 1 and np.ptp(lam_plus_H) > 0:
        ax.axvspan(lam_plus_H.min(), lam_plus_H.max(), color="tab:red", alpha=0.12,
                   label="λ+ per head")
    ax.axvline(lam_plus, color="tab:red", ls="--", lw=1.5, label=f"λ+ = {lam_plus:.3g}")
    ax.set_ylim(0.0, 1.15 * max(float(heights.max(initial=0.0)), 1e-30))
    ax.set_xlim(0.0, top)
    ax.set(xlabel="eigenvalue λ", ylabel="density", title=title)
    ax.ticklabel_format(style="sci", scilimits=(-3, 4))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    ax.legend(fontsize="small")
    return fig


def _heatmap(ax, values_LxS, steps, title: str, vmin=None, vmax=None):
    """Layers on y (layer 0 at the bottom), steps on x; returns the image for a colorbar."""
    values_LxS = np.asarray(values_LxS, np.float64)
    image = ax.imshow(values_LxS, origin="lower", aspect="auto", interpolation="nearest",
                      cmap="magma", vmin=vmin, vmax=vmax)
    steps = list(steps)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, labels=[str(steps[i]) for i in ticks])
    num_layers = values_LxS.shape[0]
    ax.set_yticks(np.unique(np.linspace(0, num_layers - 1, min(num_layers, 12)).round().astype(int)))
    ax.set(xlabel="step", ylabel="layer", title=title)
    return image


def layer_step_heatmap(values_LxS, steps, title: str, label: str = "", panel=(5.0, 3.5),
                       dpi=100) -> Figure:
    """One metric over layers (y) and steps (x), with a colorbar."""
    values_LxS = np.asarray(values_LxS, np.float64)
    if values_LxS.ndim != 2 or values_LxS.shape[1] != len(steps):
        raise ValueError(f"layer_step_heatmap: values {values_LxS.shape} must be [layers, {len(steps)} steps]")
    fig, ax = _single(panel, dpi, right=0.9)
    image = _heatmap(ax, values_LxS, steps, title)
    fig.colorbar(image, ax=ax, label=label, fraction=0.08, pad=0.03)
    return fig


def _short(trial: str) -> str:
    return trial.replace(",", ", ")


def _ordered_kinds(kinds) -> list[str]:
    kinds = set(kinds)
    return [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))


def _in_sweep_order(per_trial: dict) -> dict:
    """Trials by kind (KIND_ORDER), RoPE budget and remove_gap, read from their names."""
    kinds = _ordered_kinds(str(events.value_from_name(t, "kind")) for t in per_trial)

    def key(trial):
        fraction = events.value_from_name(trial, "rope_fraction")
        return (kinds.index(str(events.value_from_name(trial, "kind"))),
                np.inf if fraction is None else fraction,
                bool(events.value_from_name(trial, "remove_gap")), trial)
    return {t: per_trial[t] for t in sorted(per_trial, key=key)}


def mp_gap_heatmaps(scalars: pd.DataFrame, matrix: str = "qk_circuit_sum", metric: str = "mp_gap",
                    ncols: int = 4, heads: str | None = None) -> Figure:
    """Layer x step heatmap of a per-layer spectral metric, one panel per trial, one colour scale
    (a per-head matrix: heads='head_mean' or 'head_max', see events.layer_values)."""
    per_trial = _in_sweep_order(events.layer_values(scalars, metric, matrix, heads))
    if not per_trial:
        raise ValueError(f"no spectral/{matrix}/{metric}/layer_* scalars")
    vmax = max(float(np.nanmax(t.to_numpy())) for t in per_trial.values())
    vmin = min(0.0, min(float(np.nanmin(t.to_numpy())) for t in per_trial.values()))
    fig, axes = _grid(len(per_trial), ncols)
    image = None
    for ax, (trial, table) in zip(axes, per_trial.items()):
        image = _heatmap(ax, table.to_numpy(), table.columns, _short(trial), vmin, vmax)
        ax.title.set_fontsize("small")
    fig.colorbar(image, ax=axes, label=metric)
    fig.suptitle(f"{matrix}: {metric} per layer over training")
    return fig


def outlier_energy_violins(scalars: pd.DataFrame, trials: pd.DataFrame, matrix: str = "qk_circuit_sum",
                           metric: str = "outlier_energy", min_step: int = 0,
                           heads: str | None = None) -> Figure:
    """Distribution over layers and steps (>= min_step) of a per-layer metric, one violin per
    RoPE budget (rope_fraction; remove_gap trials apart), one panel per attention kind."""
    per_trial = events.layer_values(scalars, metric, matrix, heads)
    meta = trials[trials["trial"].isin(list(per_trial))]
    if meta.empty:
        raise ValueError(f"no trial of the table has spectral/{matrix}/{metric}/layer_* scalars")
    kinds = _ordered_kinds(meta["kind"])
    fig, axes = _figure(1, len(kinds), panel=(3.5, 3.2), sharey=True)
    for ax, kind in zip(axes[0], kinds):
        groups = {}
        for row in meta[meta["kind"] == kind].itertuples():
            table = per_trial[row.trial]
            values = table.loc[:, table.columns >= min_step].to_numpy().ravel()
            key = (float(row.rope_fraction), bool(row.remove_gap))
            groups.setdefault(key, []).append(values[np.isfinite(values)])
        keys = sorted(groups)
        data = [np.concatenate(groups[k]) for k in keys]
        spread = [i for i, d in enumerate(data) if d.size > 1 and np.ptp(d) > 0]
        if spread:
            ax.violinplot([data[i] for i in spread], positions=spread, showmedians=True, widths=0.8)
        for i, d in enumerate(data):      # a constant group has no density: a point at its value
            if i not in spread and d.size:
                ax.plot([i], [d[0]], "o", color="tab:blue")
        ax.set_xticks(range(len(keys)),
                      labels=[f"{f:g}" + ("\nremove_gap" if gap else "") for f, gap in keys])
        ax.set(xlabel="rope_fraction", title=kind)
    axes[0, 0].set_ylabel(metric)
    fig.suptitle(f"{matrix}: {metric} over layers and steps, by RoPE budget")
    return fig


def stable_rank_curves(scalars: pd.DataFrame, matrix: str = "qk_circuit_sum", metric: str = "stable_rank",
                       ncols: int = 4, heads: str | None = None) -> Figure:
    """A per-layer spectral metric (stable_rank, stable_rank_frac, ...) against step, one line
    per layer (dark = shallow), one panel per trial, shared y."""
    per_trial = _in_sweep_order(events.layer_values(scalars, metric, matrix, heads))
    if not per_trial:
        raise ValueError(f"no spectral/{matrix}/{metric}/layer_* scalars")
    fig, axes = _grid(len(per_trial), ncols, sharey=True)
    cmap = matplotlib.colormaps["viridis"]
    for ax, (trial, table) in zip(axes, per_trial.items()):
        num_layers = len(table.index)
        for i, (layer, row) in enumerate(table.iterrows()):
            ax.plot(table.columns.to_numpy(), row.to_numpy(), marker=".", label=f"layer {layer}",
                    color=cmap(i / max(num_layers - 1, 1) * 0.9))
        ax.set(xlabel="step", ylabel=metric, title=_short(trial))
        ax.title.set_fontsize("small")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{matrix}: {metric} per layer over training")
    return fig


def perplexity_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The final metrics of each trial (as in the HParams tab), ordered by kind, RoPE budget
    and remove_gap, so variants of one kind read top to bottom."""
    columns = {"step": "step", **{tag: name.removeprefix("final/")
                                  for name, tag in hparams.FINAL_METRICS.items()}}
    out = trials[["trial", "kind", "rope_fraction", "remove_gap"]].copy()
    for tag, name in columns.items():
        out[name] = trials[tag] if tag in trials else np.nan
    order = {k: i for i, k in enumerate(_ordered_kinds(out["kind"].dropna()))}
    out["_kind"] = out["kind"].map(order)
    out = out.sort_values(["_kind", "rope_fraction", "remove_gap"], na_position="last")
    return out.drop(columns="_kind").reset_index(drop=True)


_RANK_COLLAPSE_CURVES = (  # key of experiments.rank_collapse.run -> label, panel
    ("sr_vanilla", "A X W_V", 0), ("sr_centred", "(A - 11ᵀ/T) X W_V", 0),
    ("sr_causal", "A_c X W_V", 1), ("sr_causal_centred", "(A_c - U) X W_V", 1),
    ("sr_causal_scaled", "diag(i/T)(A_c - U) X W_V", 1))


def rank_collapse_figure(results) -> Figure:
    """The rows of experiments.rank_collapse.run: the stable rank sr(X X^T) of one attention
    layer's output against context length T, bidirectional (the paper's A and its centring)
    and causal (A_c, remove_gap's A_c - U and its row-scaled form); T marks full rank. Third
    panel: the top singular values of A and A_c."""
    rows = pd.DataFrame(results).sort_values("T")

    def col(name):
        return rows[name].to_numpy(np.float64)

    t = rows["T"].to_numpy()
    first = rows.iloc[0]
    fig, axes = _figure(1, 3, panel=(4.3, 3.5))
    for key, label, panel in _RANK_COLLAPSE_CURVES:
        axes[0, panel].errorbar(t, col(key), col(key + "_std"), marker="o", label=label)
    for ax, title in zip(axes[0, :2], ("bidirectional", "causal")):
        ax.plot(t, t, ":", color="0.5", label="T (full rank)")
        ax.set(yscale="log", ylabel="stable rank of X Xᵀ",
               title=f"{title}, setup={first['setup']}, d={'T' if first['setup'] == 'paper' else first['d']}")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax = axes[0, 2]
    for key, label, marker in (("sigma1_A", "σ1(A)", "o"), ("sigma2_A", "σ2(A)", "s"),
                               ("sigma1_causal", "σ1(A_c)", "^"), ("sigma2_causal", "σ2(A_c)", "v"),
                               ("sigma3_causal", "σ3(A_c)", "d")):
        ax.plot(t, col(key), marker=marker, label=label)
    ax.set(ylim=(0.0, 1.1 * col("sigma1_causal").max()), ylabel="singular value",
           title="Top singular values of A and A_c")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xticks(t, labels=[str(v) for v in t])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("context length T")
        ax.legend(fontsize="small")
    return fig


def activation_depth_figure(scalars: pd.DataFrame, metric: str = "rep_stable_rank",
                            trials: pd.DataFrame | None = None) -> Figure:
    """A per-layer activation metric against depth at each trial's last step: thin lines per
    trial, bold the mean of the vanilla and of the remove_gap trials (remove_gap from
    `trials`, else from the trial names), so the two attentions compare layer by layer."""
    per_trial = events.layer_values(scalars, metric)
    if not per_trial:
        raise ValueError(f"no activations/{metric}/layer_* scalars")
    known = {} if trials is None else dict(zip(trials["trial"], trials["remove_gap"].astype(bool)))
    remove_gap = {t: known.get(t, bool(events.value_from_name(t, "remove_gap"))) for t in per_trial}
    fig, axes = _figure(panel=(5.5, 3.8))
    ax = axes[0, 0]
    for group, (color, label) in _GROUP_STYLE.items():
        names = [t for t in per_trial if remove_gap[t] == group]
        if not names:
            ax.text(0.02, 0.02 + 0.06 * group, f"no {label} trials here", transform=ax.transAxes,
                    fontsize="small", color="0.4")
            continue
        last = pd.concat({t: per_trial[t].iloc[:, -1] for t in names}, axis=1)   # [layer, trial]
        for t in names:
            ax.plot(last.index, last[t], color=color, alpha=0.3, lw=0.8)
        ax.plot(last.index, last.mean(axis=1), color=color, lw=2.5, marker="o",
                label=f"{label} (mean of {len(names)})")
    ax.set(xlabel="layer", ylabel=metric, title=f"{metric} by depth, last step")
    ax.set_xticks(sorted({layer for t in per_trial.values() for layer in t.index}))
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------
# Seed bands: one line per variant, the mean over seeds with its 95% t-interval.


def seed_interval(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the values' t-interval; low = high = NaN for fewer than 2."""
    from scipy import stats   # pylint: disable=import-outside-toplevel  (scipy comes with jax)
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, np.nan, np.nan, n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def difference_interval(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's t-interval, since two variants' seeds need not
    spread alike; low = high = NaN unless each side has 2 finite values."""
    from scipy import stats   # pylint: disable=import-outside-toplevel
    a, b = (np.asarray(v, np.float64) for v in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not (a.size and b.size):
        return np.nan, np.nan, np.nan
    diff = float(a.mean() - b.mean())
    if min(a.size, b.size) < 2:
        return diff, np.nan, np.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    return diff, diff - half, diff + half


def seed_bands(frame: pd.DataFrame, x: str, value: str = "value",
               variant: str = "variant") -> pd.DataFrame:
    """Long rows (variant, seed, x, value) -> [variant, x, mean, low, high, n] over seeds."""
    rows = [(v, xv, *seed_interval(group[value]))
            for (v, xv), group in frame.groupby([variant, x], sort=False)]
    return pd.DataFrame(rows, columns=[variant, x, "mean", "low", "high", "n"])


def seed_band_axes(ax, bands: pd.DataFrame, x: str, variant: str = "variant", colors=None) -> None:
    """Draws seed_bands' rows on ax: a mean line and a shaded interval per variant."""
    cmap = matplotlib.colormaps["tab10"]
    for i, (name, group) in enumerate(bands.groupby(variant, sort=False)):
        group = group.sort_values(x)
        color = (colors or {}).get(name, cmap(i % 10))
        ax.plot(group[x], group["mean"], color=color, marker=".", label=str(name))
        ax.fill_between(group[x], group["low"], group["high"], color=color, alpha=0.2, lw=0)


def seed_band_figure(frame: pd.DataFrame, x: str, panel: str | None = None, ylabel: str = "",
                     title: str = "", ncols: int = 4, logy: bool = False,
                     order: list | None = None) -> Figure:
    """Mean over seeds and its 95% interval against x (step, layer, ...), one line per variant
    (colours by `order`, else by first appearance); one panel per value of `panel` (e.g. metric
    or layer) if given. frame: long rows with columns variant, seed, x, value (and panel)."""
    panels = [(None, frame)] if panel is None else list(frame.groupby(panel, sort=True))
    if not panels or frame.empty:
        raise ValueError(f"seed_band_figure: no rows for {title or ylabel!r}")
    order = list(order or dict.fromkeys(frame["variant"]))
    cmap = matplotlib.colormaps["tab10"]
    colors = {name: cmap(i % 10) for i, name in enumerate(order)}
    fig, axes = _grid(len(panels), ncols, panel=(4.2, 3.0))
    for ax, (key, rows) in zip(axes, panels):
        bands = seed_bands(rows, x)
        bands = bands.iloc[np.argsort([order.index(v) if v in order else len(order)
                                       for v in bands["variant"]], kind="stable")]
        seed_band_axes(ax, bands, x, colors=colors)
        ax.set(xlabel=x, ylabel=ylabel or ("" if panel == "metric" else "value"),
               title="" if key is None else str(key) if panel == "metric" else f"{panel} {key}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if logy:
            ax.set_yscale("log")
        ax.title.set_fontsize("small")
    axes[0].legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    return fig
