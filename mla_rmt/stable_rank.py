"""The package's one stable rank of token representations, the one "Mind the Gap" uses.

For tokens X [T, d] and S = X X^T, sr(S) = ||S||_F^2 / ||S||_2^2: T when the T tokens are
orthonormal, 1 when every token is the same. From the squared singular values s_i^2 of X
(the eigenvalues of S) it is sum s_i^4 / max s_i^4. The same formula serves numpy float64
(the rank-collapse experiment) and jax arrays (the activation probes, under jit).
"""
import numpy as np


def from_gram_eigs(eigs_NxP):
    """sr(S) from the eigenvalues of S = X X^T (squared singular values of X), any order."""
    top_N = eigs_NxP.max(-1)
    return (eigs_NxP ** 2).sum(-1) / (top_N ** 2 + 1e-30)


def of_tokens(x_NxTxD: np.ndarray) -> np.ndarray:
    """sr(X X^T) of each [T, d] token matrix, in float64."""
    s_NxP = np.linalg.svd(np.asarray(x_NxTxD, np.float64), compute_uv=False)
    return from_gram_eigs(s_NxP ** 2)
