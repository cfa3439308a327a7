"""Rank collapse in width at initialisation ("Mind the Gap", DESIGN 4.4).

For context lengths T <= d, draws orthonormal tokens X [T, d] (X X^T = I, the paper's
assumption), W_Q, W_K [d, d] with N(0, 1) entries (so the logits X W_Q (X W_K)^T / sqrt(d) are
iid-like N(0, 1), the paper's softmax input) and W_V with variance 1/d, forms the attention
A = softmax(logits) and reports the stable
rank ||M||_F^2 / ||M||_2^2 of M = A X W_V and of M_perp = (A - 11^T/T) X W_V. The Perron
direction of A (singular value 1, the rest shrinking like T^-1/2) drags every token onto one
representation as T grows; removing it keeps the stable rank growing with T.

    python -m mla_rmt.experiments.rank_collapse --out=/tmp/rank_collapse
"""
import json
import pathlib

import numpy as np
from absl import app, flags

_CONTEXTS = flags.DEFINE_list("T", ["8", "16", "32", "64", "128", "256", "512", "1024"], "Context lengths.")
_WIDTH = flags.DEFINE_integer("d", 1024, "Token width d (at least the largest T).")
_DRAWS = flags.DEFINE_integer("draws", 8, "Random draws per context length.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draws.")
_OUT = flags.DEFINE_string("out", "", "Directory for rank_collapse.json and rank_collapse.png.")


def stable_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.sum(s ** 2) / s[0] ** 2)


def softmax_attention(x_TxD: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = x_TxD.shape[1]
    w_q, w_k = (rng.standard_normal((d, d)) for _ in range(2))
    logits = (x_TxD @ w_q) @ (x_TxD @ w_k).T / np.sqrt(d)
    a = np.exp(logits - logits.max(1, keepdims=True))
    return a / a.sum(1, keepdims=True)


def run(contexts, d: int, draws: int, seed: int) -> list[dict]:
    if max(contexts) > d:
        raise ValueError(f"--T: context lengths up to {max(contexts)} need --d >= that, got {d}")
    rng = np.random.default_rng(seed)
    rows = []
    for t in contexts:
        vanilla, centred, s1, s2 = [], [], [], []
        for _ in range(draws):
            x = np.linalg.qr(rng.standard_normal((d, t)))[0].T    # orthonormal rows
            a = softmax_attention(x, rng)
            xv = x @ (rng.standard_normal((d, d)) / np.sqrt(d))
            vanilla.append(stable_rank(a @ xv))
            centred.append(stable_rank((a - 1.0 / t) @ xv))
            s = np.linalg.svd(a, compute_uv=False)
            s1.append(s[0])
            s2.append(s[1])
        rows.append({"T": t, "stable_rank_A": float(np.mean(vanilla)),
                     "stable_rank_A_std": float(np.std(vanilla)),
                     "stable_rank_A_perp": float(np.mean(centred)),
                     "stable_rank_A_perp_std": float(np.std(centred)),
                     "sigma1_A": float(np.mean(s1)), "sigma2_A": float(np.mean(s2))})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'T':>6} {'sr(A X W_V)':>14} {'sr((A-11^T/T) X W_V)':>22} {'sigma1(A)':>10} {'sigma2(A)':>10}"]
    for r in rows:
        lines.append(f"{r['T']:>6} {r['stable_rank_A']:>8.2f} ± {r['stable_rank_A_std']:<4.2f}"
                     f" {r['stable_rank_A_perp']:>14.2f} ± {r['stable_rank_A_perp_std']:<5.2f}"
                     f" {r['sigma1_A']:>10.3f} {r['sigma2_A']:>10.3f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, d: int) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    t = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(t, [r["stable_rank_A"] for r in rows], [r["stable_rank_A_std"] for r in rows],
                marker="o", label="A X W_V")
    ax.errorbar(t, [r["stable_rank_A_perp"] for r in rows], [r["stable_rank_A_perp_std"] for r in rows],
                marker="s", label="(A - 11ᵀ/T) X W_V")
    ax.set(xscale="log", yscale="log", xlabel="context length T", ylabel="stable rank",
           title=f"Rank collapse in width at init (d={d})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    contexts = [int(t) for t in _CONTEXTS.value]
    rows = run(contexts, _WIDTH.value, _DRAWS.value, _SEED.value)
    print(table(rows))
    if _OUT.value:
        out = pathlib.Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rank_collapse.json").write_text(json.dumps(rows, indent=1))
        plot(rows, out / "rank_collapse.png", _WIDTH.value)
        print(f"wrote {out / 'rank_collapse.json'} and {out / 'rank_collapse.png'}")


if __name__ == "__main__":
    app.run(main)
