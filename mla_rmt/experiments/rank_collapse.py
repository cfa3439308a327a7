"""Rank collapse in width at initialisation, as "Mind the Gap" runs it, and its causal forms.

Tokens X0 [T, d] are the first T rows of a Haar orthogonal d x d matrix (X0 X0^T = I), W_V
has iid N(0, 1/d) entries, and the stable rank is the package's one (mla_rmt/stable_rank.py):
sr(S) = ||S||_F^2 / ||S||_2^2 with S = X X^T. Two setups of the attention A:

- `paper`: the paper's model. A = row-softmax(G), G iid N(-ln2/2, ln2), so the unnormalised
  weights exp(G) are lognormal with mean 1 and variance 1; A does not depend on X0; d = T.
- `softmax`: A = row-softmax(X0 W_Q (X0 W_K)^T / sqrt(d)) with W_Q, W_K iid N(0, 1): logits
  close to iid N(0, 1) but computed from the tokens; d a flag (d >= T).

For each T and draw it reports sr(P X0 W_V) for five token-mixing matrices P built from the
same logits: `vanilla` A, `centred` A - 11^T/T (the paper's fix), `causal` the causal softmax
A_c, `causal_centred` A_c - U (U_ij = 1/i for j <= i: remove_gap's default), and
`causal_scaled` diag(i/T) (A_c - U) (remove_gap_mode="scaled"); plus sigma_1, sigma_2 of A,
the top three singular values of A_c and ||A_c - U||_F^2. With --depth=L it also stacks L
such layers (fresh logits and W_V per layer) without skip (X <- P X W_V) and with a skip and
LayerNorm (X <- LN(X + c P X W_V) from X = LN(X0), LN over each token's features without gain,
c the one scalar that gives the branch the Frobenius norm of X, so that the branch counts as
much as the skip while the relative sizes of its rows are kept), and reports the stable rank
of the last layer's output. docs/spectral.md ("Causal centring") reads the table.

    python -m mla_rmt.experiments.rank_collapse --setup=paper --out=results/rank_collapse
"""
import json
import pathlib

import numpy as np
from absl import app, flags

from mla_rmt import stable_rank

SETUPS = ("paper", "softmax")
MIXERS = ("vanilla", "centred", "causal", "causal_centred", "causal_scaled")

_SETUP = flags.DEFINE_enum("setup", "paper", SETUPS, "The paper's input-independent A, or softmax of the tokens' logits.")
_CONTEXTS = flags.DEFINE_list("T", ["25", "50", "100", "200", "400", "800"], "Context lengths.")
_WIDTH = flags.DEFINE_integer("d", 0, "setup=softmax: token width d (>= every T); 0 means d = T.")
_DRAWS = flags.DEFINE_integer("draws", 8, "Random draws per context length.")
_DEPTH = flags.DEFINE_integer("depth", 0, "Layers of the stacked runs (0: none).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draws.")
_OUT = flags.DEFINE_string("out", "", "Directory for rank_collapse.json, rank_collapse.txt and rank_collapse.png.")


def haar_rows(t: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """The first t rows of a Haar-distributed d x d orthogonal matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, t)))
    return (q * np.sign(np.diag(r))).T


def paper_logits(t: int, rng: np.random.Generator) -> np.ndarray:
    """G iid N(-ln2/2, ln2): exp(G) lognormal with mean 1 and variance 1."""
    return -np.log(2) / 2 + np.sqrt(np.log(2)) * rng.standard_normal((t, t))


def softmax_logits(x_TxD: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """X W_Q (X W_K)^T / sqrt(d) with W_Q, W_K iid N(0, 1), tokens rescaled to unit mean norm."""
    t, d = x_TxD.shape
    x_TxD = x_TxD * np.sqrt(t / np.sum(x_TxD ** 2))
    w_q, w_k = rng.standard_normal((2, d, d))
    return (x_TxD @ w_q) @ (x_TxD @ w_k).T / np.sqrt(d)


def _softmax(logits_TxT: np.ndarray) -> np.ndarray:
    e = np.exp(logits_TxT - logits_TxT.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mixers(logits_TxT: np.ndarray) -> dict[str, np.ndarray]:
    """The five token-mixing matrices of one layer, all from the same logits."""
    t = logits_TxT.shape[0]
    mask_TxT = np.tril(np.ones((t, t), bool))
    a_TxT = _softmax(logits_TxT)
    causal_TxT = _softmax(np.where(mask_TxT, logits_TxT, -np.inf))
    position_Tx1 = np.arange(1, t + 1)[:, None]
    causal_centred_TxT = causal_TxT - mask_TxT / position_Tx1
    return {"vanilla": a_TxT, "centred": a_TxT - 1.0 / t, "causal": causal_TxT,
            "causal_centred": causal_centred_TxT,
            "causal_scaled": causal_centred_TxT * position_Tx1 / t}


def layer_norm(x_TxD: np.ndarray) -> np.ndarray:
    """Each token's features to mean 0 and variance 1 (no gain, no bias)."""
    x_TxD = x_TxD - x_TxD.mean(-1, keepdims=True)
    return x_TxD / np.sqrt((x_TxD ** 2).mean(-1, keepdims=True) + 1e-12)


def _logits(setup: str, x_TxD: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return paper_logits(len(x_TxD), rng) if setup == "paper" else softmax_logits(x_TxD, rng)


def layer_ranks(mix: dict[str, np.ndarray], xv_TxD: np.ndarray) -> dict[str, float]:
    """sr(P X0 W_V) for each mixing matrix P of `mixers`, keys sr_<name>."""
    return {f"sr_{name}": float(stable_rank.of_tokens(p_TxT @ xv_TxD)) for name, p_TxT in mix.items()}


def one_draw(setup: str, t: int, d: int, depth: int, rng: np.random.Generator) -> dict[str, float]:
    """Every measurement of one draw at context length t (width d). From `rng`, in this order:
    the Gaussian [d, t] behind X0, the logits' Gaussians ([t, t] for G, or W_Q and W_K as
    [2, d, d]), the [d, d] Gaussian behind W_V, then the stacked layers'."""
    x0_TxD = haar_rows(t, d, rng)
    mix = mixers(_logits(setup, x0_TxD, rng))
    out = layer_ranks(mix, x0_TxD @ (rng.standard_normal((d, d)) / np.sqrt(d)))
    s_a = np.linalg.svd(mix["vanilla"], compute_uv=False)
    s_c = np.linalg.svd(mix["causal"], compute_uv=False)
    out.update(sigma1_A=s_a[0], sigma2_A=s_a[1], sigma1_causal=s_c[0], sigma2_causal=s_c[1],
               sigma3_causal=s_c[2], fro2_causal_centred=np.sum(mix["causal_centred"] ** 2))
    for residual in (False, True) if depth else ():
        for name in MIXERS:
            x_TxD = layer_norm(x0_TxD) if residual else x0_TxD     # tokens as a normed layer sees them
            for _ in range(depth):
                branch_TxD = mixers(_logits(setup, x_TxD, rng))[name] @ x_TxD @ (
                    rng.standard_normal((d, d)) / np.sqrt(d))
                if residual:          # the branch at the skip's overall scale, one scalar per layer
                    branch_TxD *= np.sqrt(np.sum(x_TxD ** 2) / np.sum(branch_TxD ** 2))
                    branch_TxD = layer_norm(x_TxD + branch_TxD)
                x_TxD = branch_TxD
            key = f"sr_deep_{'residual_' if residual else ''}{name}"
            out[key] = float(stable_rank.of_tokens(x_TxD))
    return {k: float(v) for k, v in out.items()}


def run(contexts, setup: str = "paper", d: int = 0, draws: int = 8, depth: int = 0,
        seed: int = 0) -> list[dict]:
    """One row per context length: each measurement's mean over draws and its std (`_std`).
    Draw k at length t uses the generator np.random.default_rng([seed, t, k])."""
    if setup not in SETUPS:
        raise ValueError(f"--setup: one of {SETUPS}, got {setup!r}")
    if setup == "paper" and d:
        raise ValueError(f"--d: the paper's setup has d = T; got d={d}")
    if d and max(contexts) > d:
        raise ValueError(f"--d: context lengths up to {max(contexts)} need d >= that, got {d}")
    rows = []
    for t in contexts:
        width = d or t
        draws_list = [one_draw(setup, t, width, depth, np.random.default_rng([seed, t, k]))
                      for k in range(draws)]
        row = {"T": t, "setup": setup, "d": width, "draws": draws, "depth": depth}
        for key in draws_list[0]:
            values = [m[key] for m in draws_list]
            row[key] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values))
        rows.append(row)
    return rows


def slope(rows: list[dict], key: str) -> float:
    """Slope of the least-squares line of the mean of `key` against T."""
    t = np.array([r["T"] for r in rows], float)
    return float(np.polyfit(t, [r[key] for r in rows], 1)[0])


_ONE_LAYER = (("sr_vanilla", "A"), ("sr_centred", "A-11^T/T"), ("sr_causal", "A_c"),
              ("sr_causal_centred", "A_c-U"), ("sr_causal_scaled", "diag(i/T)(A_c-U)"))
_SPECTRA = (("sigma1_A", "s1(A)"), ("sigma2_A", "s2(A)"), ("sigma1_causal", "s1(A_c)"),
            ("sigma2_causal", "s2(A_c)"), ("sigma3_causal", "s3(A_c)"),
            ("fro2_causal_centred", "|A_c-U|_F^2"))


def _block(rows: list[dict], title: str, cols, spectra=()) -> list[str]:
    width = [max(len(label), 13) for _, label in cols]
    lines = [title, f"{'T':>5} " + " ".join(f"{label:>{w}}" for (_, label), w in zip(cols, width))
             + "".join(f" {label:>11}" for _, label in spectra)]
    for r in rows:
        cells = [f"{r[key]:.2f} ± {r[key + '_std']:.2f}".rjust(w) for (key, _), w in zip(cols, width)]
        lines.append(f"{r['T']:>5} " + " ".join(cells) + "".join(f" {r[key]:>11.3f}" for key, _ in spectra))
    lines.append("slope of sr against T (least squares): "
                 + ", ".join(f"{label} {slope(rows, key):.4f}" for key, label in cols))
    return lines


def table(rows: list[dict]) -> str:
    """Plain-text tables: sr(P X0 W_V) (mean ± std over draws) for each mixing matrix P, the
    spectra of A and A_c, and with depth the last layer's sr without and with skip + LN."""
    r0 = rows[0]
    width = "T" if r0["setup"] == "paper" else r0["d"]
    lines = _block(rows, f"setup={r0['setup']}, d={width}, {r0['draws']} draws: "
                         "sr(P X W_V) for P =", _ONE_LAYER, _SPECTRA)
    depth = r0["depth"]
    for prefix, what in (("sr_deep_", "no skip"), ("sr_deep_residual_", "skip + LayerNorm")):
        if depth:
            cols = [(prefix + key[3:], label) for key, label in _ONE_LAYER]
            lines += [""] + _block(rows, f"{depth} layers, {what}: sr of the last output for P =", cols)
    return "\n".join(lines)


def main(argv):
    del argv
    contexts = [int(t) for t in _CONTEXTS.value]
    rows = run(contexts, _SETUP.value, _WIDTH.value, _DRAWS.value, _DEPTH.value, _SEED.value)
    text = table(rows)
    print(text)
    if _OUT.value:
        from mla_rmt import plots  # pylint: disable=import-outside-toplevel
        out = pathlib.Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rank_collapse.json").write_text(json.dumps(rows, indent=1))
        (out / "rank_collapse.txt").write_text(text + "\n")
        plots.rank_collapse_figure(rows).savefig(out / "rank_collapse.png", dpi=120)
        print(f"wrote {out / 'rank_collapse.json'}, rank_collapse.txt and rank_collapse.png")


if __name__ == "__main__":
    app.run(main)
