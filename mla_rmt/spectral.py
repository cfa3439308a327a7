"""Marchenko–Pastur diagnostics of attention weights (docs/spectral.md): ESDs, null law, metrics.

Three layers, each usable on its own from a notebook:

* ESDs (jax, jit/vmap-able, fp32 at HIGHEST precision, no gradients): `product_esd(a, b)` gives
  the nonzero squared singular values of a @ b.T from two K x K Gram factors and `eigvalsh`,
  never an SVD of the big matrix; `esd(w)` and `gram_esd(g)` for one matrix.
* The null law (numpy, once per static shape, memoised): at iid Gaussian init the ESD of a
  product of Gaussian factors is the free product MP(g_1) ⊠ ... ⊠ MP(g_L), not MP. `null_edge`,
  `null_median`, `null_density` in units of the null mean; `chain_gammas(dims)` maps the chain of
  matrix dims to the gammas, so callers pass shapes only.
* `mp_metrics(eigs, gammas)`: the metrics, the bulk scale set by robust (trimmed, iterated)
  median matching (`bulk_scale`).

The math (S-transforms, which eigenvalues count, dims -> gammas) is written up in docs/spectral.md.
"""
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# Below this fraction of lambda_1 the fp32 Gram route cannot resolve an eigenvalue (|err| is
# ~1e-6 lambda_1), so lambda_plus is floored there in the ratios: mp_gap <= 1e6 - 1.
RESOLUTION = 1e-6

METRIC_NAMES = ("mp_gap", "outlier_count", "outlier_energy", "mp_soft_rank", "stable_rank",
                "stable_rank_frac", "spectral_entropy", "lambda_plus", "lambda_max", "bulk_scale")


# ESDs (jax) -----------------------------------------------------------------------------------

def _f32(x):
    """stop_gradient, and at least fp32 (bf16 -> fp32; fp64 stays fp64 under jax x64)."""
    x = jnp.asarray(x)
    return jax.lax.stop_gradient(x.astype(jnp.promote_types(x.dtype, jnp.float32)))


def _gram(x_NxK):
    """x^T x [..., K, K] at full precision."""
    return jnp.einsum("...nk,...nl->...kl", x_NxK, x_NxK, precision=HIGHEST)


def _descending(eigs):
    """eigvalsh output (ascending, may dip below 0 by rounding) -> descending, clipped at 0."""
    return jnp.maximum(eigs, 0.0)[..., ::-1]


def _one_at_a_time_on_cpu(fn, x_BxKxK):
    """fn over the leading axes of x; on CPU one matrix at a time (lax.map).

    jax's batched CPU eigh blocks a thread-pool worker until its batch is done, so two of them
    running at once (XLA runs independent ops concurrently) can deadlock a small pool; single
    matrices run inline. Accelerators keep the batched kernel.
    """
    batch, k = x_BxKxK.shape[:-2], x_BxKxK.shape[-1]
    if not batch:
        return fn(x_BxKxK)
    flat = x_BxKxK.reshape(-1, k, k)
    out = jax.lax.platform_dependent(flat, cpu=lambda m: jax.lax.map(fn, m), default=fn)
    return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), out)


@jax.custom_batching.custom_vmap
def eigvalsh(x_KxK):
    """Ascending eigenvalues [..., K] of symmetric matrices (see _one_at_a_time_on_cpu)."""
    return _one_at_a_time_on_cpu(jnp.linalg.eigvalsh, x_KxK)


@jax.custom_batching.custom_vmap
def eigh(x_KxK):
    """(eigenvalues [..., K], eigenvectors [..., K, K]) of symmetric matrices."""
    return _one_at_a_time_on_cpu(lambda m: tuple(jnp.linalg.eigh(m)), x_KxK)


@eigvalsh.def_vmap
def _eigvalsh_vmap(axis_size, in_batched, x_NxKxK):
    del axis_size, in_batched        # vmap adds a leading batch axis: still one at a time on CPU
    return eigvalsh(x_NxKxK), True


@eigh.def_vmap
def _eigh_vmap(axis_size, in_batched, x_NxKxK):
    del axis_size, in_batched
    return eigh(x_NxKxK), (True, True)


def gram_esd(g_KxK):
    """Eigenvalues [..., K] of a symmetric PSD Gram, descending, tiny negatives clipped to 0."""
    g = _f32(g_KxK)
    return _descending(eigvalsh(0.5 * (g + jnp.swapaxes(g, -1, -2))))


def esd(w_NxM):
    """Squared singular values [..., min(N, M)] of w, descending: eigvalsh of the smaller Gram.

    Absolute error ~ 1e-7 * lambda_1 in fp32 (the Gram squares the condition number, so values
    below ~1e-6 lambda_1 are rounding-dominated; the metrics never look that low).
    """
    w = _f32(w_NxM)
    if w.shape[-1] > w.shape[-2]:
        w = jnp.swapaxes(w, -1, -2)
    return gram_esd(_gram(w))


def product_esd(a_NxK, b_MxK):
    """Squared singular values [..., K] of a @ b.T, descending, exactly through K x K factors.

    The nonzero spectrum of (a b^T)(a b^T)^T = a (b^T b) a^T is that of G_a G_b, with
    G_a = a^T a, G_b = b^T b. With G_a = V diag(w) V^T (eigh, which unlike Cholesky is stable
    when G_a is singular or ill-conditioned), G_a G_b is similar to the symmetric PSD
    D V^T G_b V D, D = diag(sqrt(w)) (i.e. R G_b R with R = G_a^{1/2}), so one more eigvalsh
    gives the spectrum. Backward error ~ eps * |G_a| |G_b|: every value is within ~1e-6 lambda_1
    of the float64 SVD even when one factor has condition number 1e6 (tests/test_spectral.py).

    a [..., N, K] and b [..., M, K] (N, M may differ; leading axes broadcast). Returns K values;
    a @ b.T has rank <= min(N, M, K), and the trailing K - rank values are ~0 (rounding).
    """
    a, b = _f32(a_NxK), _f32(b_MxK)
    w_K, v_KxK = eigh(_gram(a))
    d_K = jnp.sqrt(jnp.maximum(w_K, 0.0))
    vtgv_KxK = jnp.einsum("...ki,...kl,...lj->...ij", v_KxK, _gram(b), v_KxK, precision=HIGHEST)
    m_KxK = d_K[..., :, None] * vtgv_KxK * d_K[..., None, :]
    return gram_esd(m_KxK)


# The null law (numpy, once per static shape) ------------------------------------------------

def chain_gammas(dims: Sequence[int]) -> tuple[float, ...]:
    """Gammas of the null law of X_1 X_2 ... X_L, X_j an iid Gaussian dims[j-1] x dims[j].

    The p = min(dims) nonzero squared singular values follow, in units of their mean,
    MP(g_1) ⊠ ... ⊠ MP(g_L) with g_j = p / dims[j] over every dim but one copy of the minimum
    (docs/spectral.md derives it; chain order does not matter). A factor repeated
    deterministically (a shared key copied to H heads, GQA groups) is an isometry up to scale:
    leave its dim out of the chain.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"chain_gammas: need >= 2 positive dims, got {dims}")
    rest = list(dims)
    rest.remove(min(dims))
    return tuple(sorted(min(dims) / d for d in rest))


def canonical_gammas(gammas) -> tuple[float, ...]:
    """Sorted gammas in (0, 1]: gamma = 0 (an infinitely wide factor) is dropped, and gammas > 1
    are re-expressed on the smallest space (only the p = min nonzero eigenvalues count)."""
    gs = [float(g) for g in np.atleast_1d(np.asarray(gammas, dtype=np.float64))]
    if any(not np.isfinite(g) or g < 0 for g in gs):
        raise ValueError(f"gammas must be finite and >= 0, got {gammas}")
    gs = [g for g in gs if g > 0]
    if all(g <= 1 for g in gs):
        return tuple(sorted(gs))
    # Relative dims: the reference space 1 and one space 1/g per factor; re-reference to the min.
    rel = [1.0] + [1.0 / g for g in gs]
    p = min(rel)
    rel.remove(p)
    return tuple(sorted(p / d for d in rel))


@functools.lru_cache(maxsize=None)
def _edge(gs: tuple[float, ...]) -> float:
    if not gs:
        return 1.0
    g = np.asarray(gs)
    # d/dz log[(1+z)/z prod(1+g z)] = 0  <=>  h(z) = sum g z(1+z)/(1+g z) - 1 = 0, h increasing.
    h = lambda z: float(np.sum(g * z * (1 + z) / (1 + g * z)) - 1.0)
    lo, hi = 1e-12, 1.0
    while h(hi) < 0:
        hi *= 2.0
    for _ in range(200):  # bisection in log z; e is flat at its minimum, so this is exact in fp64
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if h(mid) < 0 else (lo, mid)
    z = np.sqrt(lo * hi)
    return float((1 + z) / z * np.prod(1 + g * z))


def null_edge(gammas) -> float:
    """Upper edge of MP(g_1) ⊠ ... ⊠ MP(g_L) in units of its mean:
    e = min_{z>0} (1+z)/z prod_i (1 + g_i z); (g,) -> (1+sqrt g)^2, (1, 1) -> 27/4."""
    return _edge(canonical_gammas(gammas))


def _curve(gs: tuple[float, ...], theta):
    """The null law along its boundary curve, parametrised by theta = arg z in (0, pi).

    S(z) = prod 1/(1 + g_i z) gives psi^{-1}(z) = z / ((1+z) prod(1 + g_i z)), psi(1/x) =
    x G(x) - 1 with G the Cauchy transform: on the support, z = psi(1/(x - i0)) is a complex
    root of x z = (1+z) prod(1 + g_i z). Writing z = r e^{i theta}, x is real and positive iff
    arg(1+z) + sum arg(1 + g_i z) = theta, increasing in r from -theta to L theta: one root r.
    Along it (z in the upper half-plane):
        x(theta)    = |(1+z) prod(1 + g_i z) / z|         (e at theta -> 0, the lower edge at pi)
        rho(theta)  = Im z / (pi x)                       (rho = -Im G(x + i0) / pi)
        tail(theta) = P(X > x) = [theta - L Im z + sum (1/g_i - 1) arg(1 + g_i z)] / pi
    the tail from integrating G dx = (1+z) dlog x in closed form: no quadrature, no root picking.
    """
    g = np.asarray(gs, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    turn = np.exp(1j * theta)
    args = lambda z: np.angle(1 + np.multiply.outer(z, g))
    lo, hi = np.full(theta.shape, -40.0), np.full(theta.shape, 40.0)  # bracket log r
    for _ in range(110):
        mid = 0.5 * (lo + hi)
        z = np.exp(mid) * turn
        neg = np.angle(1 + z) + args(z).sum(axis=-1) < theta
        lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
    z = np.exp(0.5 * (lo + hi)) * turn
    x = np.abs((1 + z) * np.prod(1 + np.multiply.outer(z, g), axis=-1) / z)
    tail = (theta - len(gs) * z.imag + np.sum((1 / g - 1) * args(z), axis=-1)) / np.pi
    return x, z.imag / (np.pi * x), tail


@functools.lru_cache(maxsize=None)
def _density_table(gs: tuple[float, ...]):
    t = np.linspace(0.0, 1.0, 8193)[1:-1]
    x, rho, _ = _curve(gs, np.pi * 0.5 * (1 - np.cos(np.pi * t)))  # dense near both edges
    return x[::-1], rho[::-1]  # x increasing


def null_density(gammas, x):
    """Density of MP(g_1) ⊠ ... ⊠ MP(g_L) at x (numpy, units of the mean), for ESD plots;
    interpolated along the boundary curve (`_curve`), 0 off the support."""
    gs = canonical_gammas(gammas)
    if not gs:
        raise ValueError("the law with no factors is a point mass at 1: it has no density")
    xs, rho = _density_table(gs)
    x = np.asarray(x, dtype=np.float64)
    return np.where((x >= xs[0]) & (x <= xs[-1]), np.interp(x, xs, rho), 0.0)


@functools.lru_cache(maxsize=None)
def _median(gs: tuple[float, ...]) -> float:
    if not gs:
        return 1.0
    lo, hi = 1e-12, np.pi - 1e-12
    for _ in range(4):  # zoom on tail(theta) = 1/2 (tail increases with theta): (1/512)^4 of pi
        theta = np.linspace(lo, hi, 513)
        _, _, tail = _curve(gs, theta)
        i = int(np.searchsorted(tail, 0.5))
        lo, hi = theta[max(i - 1, 0)], theta[min(i, len(theta) - 1)]
    x, _, tail = _curve(gs, np.array([lo, hi]))
    w = 0.0 if tail[1] == tail[0] else (0.5 - tail[0]) / (tail[1] - tail[0])
    return float(x[0] + w * (x[1] - x[0]))


def null_median(gammas) -> float:
    """Median of MP(g_1) ⊠ ... ⊠ MP(g_L) in units of its mean, from the free-probability law:
    the closed-form tail along its boundary curve (`_curve`) solved for 1/2. Deterministic,
    size-free and ~1e-9 accurate (a Monte-Carlo median would carry O(1/p) finite-size bias)."""
    return _median(canonical_gammas(gammas))


class NullLaw(NamedTuple):
    """A null law reduced to what the metrics need, both in units of the null mean."""
    edge: float
    median: float


def null_law(gammas, null: str = "product") -> NullLaw:
    """'product': MP(g_1) ⊠ ... ⊠ MP(g_L) (the law at iid init); 'mp': plain MP(gammas[0]),
    the classical framing (gammas[0] is the W's own aspect ratio for the chains of docs/spectral.md)."""
    gs = tuple(np.atleast_1d(np.asarray(gammas, dtype=np.float64)).tolist())
    if null == "mp":
        if not gs:
            raise ValueError("null='mp' needs a gamma")
        gs = gs[:1]
    elif null != "product":
        raise ValueError(f"null must be 'product', 'mp' or a NullLaw, got {null!r}")
    return NullLaw(null_edge(gs), null_median(gs))


# The asymptotic edge is where the largest eigenvalue's Tracy–Widom fluctuation is centred:
# P(lambda_1 <= e) -> F_TW1(0) at every shape, so an analytic edge flags ~17% of init matrices
# (F_TW1(0) = 0.837 from bench/tw_quantile.py). A sampled law takes this quantile of lambda_1 for its edge.
TW1_AT_ZERO = 0.83


def sampled_null_law(eigs_SxP, quantile: float = TW1_AT_ZERO) -> NullLaw:
    """A NullLaw from init draws [samples, p] at the true size, for matrices that are not one
    product chain (e.g. a whole mla_decoupled head, rotary and content branches concatenated).

    median: the mean over samples of median(lambda) / mean(lambda). edge: the `quantile` of
    lambda_1 / s over samples, s the bulk scale mp_metrics would fit to that sample. Not the
    mean of lambda_1 (the finite-p expected maximum, exceeded by about half of all init draws):
    the quantile at which an analytic edge sits, F_TW1(0), so a sampled law flags init matrices
    as often as an analytic one does.
    """
    eigs = np.asarray(eigs_SxP, np.float64).reshape(-1, np.shape(eigs_SxP)[-1])
    eigs = eigs / eigs.mean(axis=-1, keepdims=True)
    median = float(np.mean(np.median(eigs, axis=-1)))
    law = NullLaw(float(np.quantile(eigs.max(axis=-1) / (np.median(eigs, axis=-1) / median),
                                    quantile)), median)
    for _ in range(2):   # the robust scale trims what lies above the edge: refit against it
        scale = np.asarray(jax.jit(bulk_scale)(eigs.astype(np.float32), law), np.float64)
        law = NullLaw(float(np.quantile(eigs.max(axis=-1) / scale, quantile)), median)
    return law


empirical_null_law = sampled_null_law


# Metrics (jax) ----------------------------------------------------------------------------------

def _median_of_smallest(sorted_P, n):
    """Median of the n smallest values of ascending sorted_P [..., p], n [...] int >= 1."""
    lo = jnp.take_along_axis(sorted_P, ((n - 1) // 2)[..., None], axis=-1)[..., 0]
    hi = jnp.take_along_axis(sorted_P, (n // 2)[..., None], axis=-1)[..., 0]
    return 0.5 * (lo + hi)


def bulk_scale(eigs_P, law: NullLaw):
    """Robust bulk scale s [...] of ESDs [..., p] in units of the null mean (jit/vmap-able).

    Median matching, iterated after trimming: s_0 = median(lambda) / mu, then
    s_{n+1} = median{lambda_i <= s_n e} / mu. The trimmed values lie above the null's support
    at the current scale, so what remains is matched against the null's median itself (its
    quantiles conditional on lying below the edge). s_n decreases monotonically to the largest
    self-consistent scale, in at most p steps (one or two when outliers are large). Plain
    median matching (s_0) moves lambda_+ by +5/+25/+49% when 4/16/24 of 64 values hold 70% of
    the energy; this stays within a few percent. At least a quarter of the values stay in the
    bulk (a spectrum with more outliers has no bulk to fit). docs/spectral.md, "Metrics".
    """
    lam = jnp.maximum(_f32(eigs_P), 0.0)
    p = lam.shape[-1]
    srt = jnp.sort(lam, axis=-1)
    batch = lam.shape[:-1]
    min_bulk = max(1, -(-p // 4))
    s0 = _median_of_smallest(srt, jnp.full(batch, p)) / law.median

    def step(state):
        s, _, i = state
        n = jnp.maximum(jnp.sum(srt <= (s * law.edge)[..., None], axis=-1), min_bulk)
        return _median_of_smallest(srt, n) / law.median, s, i + 1

    def moving(state):
        s, prev, i = state
        return jnp.any(s < prev) & (i < p)

    s, _, _ = jax.lax.while_loop(moving, step, step((s0, s0, 0)))
    return s


def mp_metrics(eigs_P, gammas, null="product") -> dict:
    """The metrics (docs/spectral.md) of ESDs eigs [..., p] (any order), batched over leading axes.

    Bulk scale s by robust median matching (`bulk_scale`): trimmed outliers do not move it;
    lambda_plus = s * e. Pass exactly the p nonzero values (p the matrix's structural rank;
    stable_rank_frac divides by it). gammas (e.g. chain_gammas(dims))
    and null are static (jit with static_argnums); null is 'product', 'mp' or a NullLaw (then
    gammas is unused). Returns {name: float array [...]}
    (outlier_count as a float). Zero spectra give finite values: mp_gap 0, mp_soft_rank 1,
    the rest 0; mp_gap is capped at 1/RESOLUTION - 1 when the bulk is below fp32 resolution.
    """
    law = null if isinstance(null, NullLaw) else null_law(gammas, null)
    lam = jnp.maximum(_f32(eigs_P), 0.0)
    p = lam.shape[-1]
    tiny = jnp.finfo(lam.dtype).tiny
    total = jnp.sum(lam, axis=-1)
    lam1 = jnp.max(lam, axis=-1)
    scale = bulk_scale(lam, law)
    lam_plus = scale * law.edge
    above = lam > lam_plus[..., None]
    spiked = lam1 > lam_plus
    floor_plus = jnp.maximum(lam_plus, jnp.maximum(RESOLUTION * lam1, tiny))
    frac = lam / jnp.maximum(total, tiny)[..., None]
    logs = jnp.log2(jnp.where(frac > 0, frac, 1.0))
    stable_rank = jnp.where(lam1 > 0, total / jnp.maximum(lam1, tiny), 0.0)
    return {
        "mp_gap": jnp.where(spiked, jnp.maximum(lam1 / floor_plus - 1.0, 0.0), 0.0),
        "outlier_count": jnp.sum(above, axis=-1).astype(lam.dtype),
        "outlier_energy": jnp.sum(jnp.where(above, lam, 0.0), axis=-1) / jnp.maximum(total, tiny),
        "mp_soft_rank": jnp.where(spiked, lam_plus / jnp.maximum(lam1, tiny), 1.0),
        "stable_rank": stable_rank,
        "stable_rank_frac": stable_rank / p,
        "spectral_entropy": -jnp.sum(frac * logs, axis=-1),
        "lambda_plus": lam_plus,
        "lambda_max": lam1,
        "bulk_scale": scale,
    }
