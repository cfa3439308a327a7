"""The power-law tail fit: equal to a plain float64 Clauset fit and to `powerlaw`, finds a known
exponent, ignores the scale of the eigenvalues, and says when it cannot be believed."""
import warnings

import numpy as np
import pytest

from mla_rmt import tail_fit


def clauset_reference(x):
    """The recipe written out, one candidate x_min at a time, in float64."""
    x = np.sort(np.asarray(x, np.float64))
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / x[i]))
        if not np.isfinite(alpha) or alpha <= 1:
            continue
        model = 1 - (tail / x[i]) ** (1 - alpha)
        ks = np.max(np.abs(model - np.arange(n) / n))     # at the bottom of each CDF step
        if best is None or ks < best[0]:
            best = (ks, alpha, x[i], n)
    return best


def _samples(rng):
    wishart = rng.standard_t(3, (300, 120))
    return [rng.pareto(1.5, 400) + 1.0,                                  # density exponent 2.5
            np.linalg.eigvalsh(wishart.T @ wishart),                       # heavy-tailed ESD
            np.linalg.eigvalsh((lambda w: w.T @ w)(rng.standard_normal((200, 80))))]   # MP bulk


def test_equals_the_written_out_recipe_and_powerlaw(rng):
    import powerlaw  # pylint: disable=import-outside-toplevel
    for x in _samples(rng):
        got = tail_fit.fit(rng.permutation(x))
        ks, alpha, xmin, n = clauset_reference(x)
        # the MP bulk has no power-law tail: its best tail is short in ~1 draw of 10
        assert got["status"] == ("ok" if n >= tail_fit.MIN_TAIL else "short_tail"), (got, n)
        np.testing.assert_allclose([got["alpha"], got["xmin"], got["ks_distance"], got["n_tail"]],
                                   [alpha, xmin, ks, n], rtol=1e-10)
        np.testing.assert_allclose(got["alpha_sigma"], (alpha - 1) / np.sqrt(n), rtol=1e-10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = powerlaw.Fit(x, verbose=False, parameter_ranges={"alpha": [1, None]})
        np.testing.assert_allclose([got["alpha"], got["xmin"], got["alpha_sigma"], got["ks_distance"]],
                                   [ref.power_law.alpha, ref.xmin, ref.power_law.sigma, ref.power_law.D],
                                   rtol=1e-6)


def test_finds_a_known_exponent(rng):
    """alpha - exponent is ~N(0, alpha_sigma) (sd 1.02 alpha_sigma over 687 fresh fits): 4.5
    sigma leaves ~2e-5 per run for the three exponents."""
    for exponent in (2.2, 3.0, 4.5):
        x = rng.pareto(exponent - 1, 3000) + 1.0          # density ~ x^-exponent above 1
        got = tail_fit.fit(x)
        assert abs(got["alpha"] - exponent) < 4.5 * got["alpha_sigma"] + 0.02, (exponent, got)


def test_scale_of_the_eigenvalues_changes_only_xmin(rng):
    x = _samples(rng)[1]
    a, b = tail_fit.fit(x), tail_fit.fit(37.5 * x)
    np.testing.assert_allclose([b["alpha"], b["ks_distance"], b["n_tail"]],
                               [a["alpha"], a["ks_distance"], a["n_tail"]], rtol=1e-9)
    np.testing.assert_allclose(b["xmin"], 37.5 * a["xmin"], rtol=1e-12)


def test_status_says_when_not_to_believe_it(rng):
    assert tail_fit.fit(np.arange(1.0, 10.0))["status"] == "too_few"           # 9 values
    assert np.isnan(tail_fit.fit([0.0] * 50 + [1.0] * 5)["alpha"])             # zeros do not count
    assert tail_fit.fit(np.ones(40))["status"] == "failed"
    # A bulk with a handful of values far above it: the best tail is the handful.
    x = np.concatenate([rng.uniform(1.0, 1.01, 200), [50.0, 80.0, 200.0, 900.0]])
    got = tail_fit.fit(x)
    assert got["status"] == "short_tail" and got["n_tail"] < tail_fit.MIN_TAIL


def test_fit_spectra_keeps_the_layer_and_head_axes(rng):
    eigs = rng.pareto(2.0, (3, 2, 64)) + 1.0
    fits = tail_fit.fit_spectra(eigs)
    assert np.shape(fits["alpha"]) == (3, 2) and np.shape(fits["status"]) == (3, 2)
    assert fits["alpha"][2][1] == pytest.approx(tail_fit.fit(eigs[2, 1])["alpha"], rel=1e-12)
    mean, ok = tail_fit.table_values(fits)
    assert mean.shape == ok.shape == (3,)
