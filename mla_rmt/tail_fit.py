"""Power-law fit of an ESD's tail (WeightWatcher's alpha), next to the MP metrics, never instead.

A heavy-tailed ESD has density ~ lambda^-alpha above some x_min. The fit is the continuous
maximum-likelihood one of Clauset, Shalizi & Newman (2009), the estimator WeightWatcher and the
`powerlaw` package use: for each candidate x_min (every eigenvalue but the largest),
alpha = 1 + n / sum log(lambda_i / x_min) over the n values >= x_min; x_min is the candidate
whose fitted law is closest to the tail in Kolmogorov-Smirnov distance D (measured, as both of
those tools do, at the bottom of each step of the empirical CDF); the standard error is
sigma = (alpha - 1) / sqrt(n). No upper cut-off (WeightWatcher's default).

Written here rather than called from `powerlaw` (2.0): that package bounds alpha to [0, 3] by
default and, outside (1.5, 3], refits every candidate by Nelder-Mead (about 2 s for one
768-value ESD on a CPU core); the closed form over all candidates at once is one O(p^2) numpy
pass. tests/test_tail_fit.py checks it against `powerlaw` with its range opened.

The fit always returns numbers; `status` says whether to believe them:
  ok          the fit ran, and its tail holds at least MIN_TAIL values
  short_tail  the chosen tail holds fewer than MIN_TAIL values: alpha rests on a handful
  too_few     fewer than MIN_VALUES positive eigenvalues: no fit (alpha NaN)
  failed      no candidate gave a finite alpha > 1 (e.g. all values equal)
"""
import numpy as np

MIN_VALUES = 10
MIN_TAIL = 10
STATUSES = ("ok", "short_tail", "too_few", "failed")
FIELDS = ("alpha", "alpha_sigma", "xmin", "ks_distance", "n_tail")
_ROWS = 256   # candidates per block: the KS pass holds a [_ROWS, p] float64 array


def _candidates(logs_P: np.ndarray):
    """alpha [p-1] and KS distance D [p-1] of the fit at each candidate x_min = lambda_i
    (ascending logs; the tail of candidate i is lambda_i..lambda_{p-1}, n_i = p - i values)."""
    p = logs_P.size
    n_C = (p - np.arange(p - 1)).astype(np.float64)
    suffix_P = np.cumsum(logs_P[::-1])[::-1]                 # sum_{j >= i} log lambda_j
    denom_C = suffix_P[:-1] - n_C * logs_P[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_C = np.where(denom_C > 0, 1.0 + n_C / denom_C, np.nan)
    d_C = np.full(p - 1, np.inf)
    j_P = np.arange(p)
    for lo in range(0, p - 1, _ROWS):
        i_R = np.arange(lo, min(lo + _ROWS, p - 1))
        a_R = alpha_C[i_R]
        rel_RxP = logs_P[None, :] - logs_P[i_R, None]        # log(lambda_j / x_min)
        with np.errstate(over="ignore", invalid="ignore"):
            model_RxP = 1.0 - np.exp((1.0 - a_R[:, None]) * rel_RxP)   # fitted CDF at lambda_j
        k_RxP = (j_P[None, :] - i_R[:, None]).astype(np.float64)
        n_R = n_C[i_R][:, None]
        gap_RxP = np.abs(model_RxP - k_RxP / n_R)
        gap_RxP = np.where(k_RxP >= 0, gap_RxP, -np.inf)
        d_R = gap_RxP.max(axis=1)
        d_C[i_R] = np.where(np.isfinite(a_R) & (a_R > 1.0), d_R, np.inf)
    return alpha_C, d_C


def fit(eigs) -> dict:
    """{alpha, alpha_sigma, xmin, ks_distance, n_tail, status} of one ESD (any order)."""
    lam = np.asarray(eigs, np.float64).ravel()
    lam = np.sort(lam[np.isfinite(lam) & (lam > 0)])
    out = {"alpha": float("nan"), "alpha_sigma": float("nan"), "xmin": float("nan"),
           "ks_distance": float("nan"), "n_tail": 0, "status": "too_few"}
    if lam.size < MIN_VALUES:
        return out
    alpha_C, d_C = _candidates(np.log(lam))
    if not np.isfinite(d_C).any():
        out["status"] = "failed"
        return out
    i = int(np.argmin(d_C))
    n_tail = lam.size - i
    alpha = float(alpha_C[i])
    out.update(alpha=alpha, alpha_sigma=float((alpha - 1.0) / np.sqrt(n_tail)), xmin=float(lam[i]),
               ks_distance=float(d_C[i]), n_tail=int(n_tail),
               status="ok" if n_tail >= MIN_TAIL else "short_tail")
    return out


def fit_spectra(eigs_LxP) -> dict[str, list]:
    """Fits over the leading axes of eigs [L, (H,) p]: {field: nested lists [L] or [L][H]}."""
    eigs = np.asarray(eigs_LxP, np.float64)
    batch = eigs.shape[:-1]
    fits = [fit(e) for e in eigs.reshape(-1, eigs.shape[-1])]
    out = {}
    for name in FIELDS + ("status",):
        values = np.array([f[name] for f in fits], dtype=object).reshape(batch)
        out[name] = values.tolist()
    return out


def table_values(fits: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (mean alpha over heads with status ok, share of fits with status ok)."""
    alpha = np.asarray(fits["alpha"], np.float64)
    ok = np.asarray(fits["status"]) == "ok"
    alpha, ok = alpha.reshape(alpha.shape[0], -1), ok.reshape(ok.shape[0], -1)
    with np.errstate(invalid="ignore"):
        mean = np.where(ok.any(axis=1), np.nansum(np.where(ok, alpha, 0.0), axis=1)
                        / np.maximum(ok.sum(axis=1), 1), np.nan)
    return mean, ok.mean(axis=1)
