"""F_TW1(0): how often the largest eigenvalue of a real Gaussian matrix stays below the asymptotic
edge. Sampled edges of spectral.sampled_null_law sit at this quantile of lambda_1 (TW1_AT_ZERO).

    python bench/tw_quantile.py [--n=4000] [--samples=20000]

lambda_max of GOE(n) through the Dumitriu–Edelman tridiagonal model (O(n) per sample), scaled to
(lambda_max - 2 sqrt n) n^(1/6), which tends to the real Tracy–Widom law TW1 (mean -1.2065).
"""
import argparse

import numpy as np
from scipy.linalg import eigvalsh_tridiagonal


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.n
    tw = np.empty(args.samples)
    for i in range(args.samples):
        diag = rng.standard_normal(n) * np.sqrt(2)
        off = np.sqrt(rng.chisquare(np.arange(n - 1, 0, -1)))
        top = eigvalsh_tridiagonal(diag, off, select="i", select_range=(n - 1, n - 1))[0]
        tw[i] = (top - 2 * np.sqrt(n)) * n ** (1 / 6)
    print(f"n={n} samples={args.samples}: mean {tw.mean():.4f} sd {tw.std():.4f} "
          f"F(0) = P(TW1 <= 0) = {np.mean(tw <= 0):.4f} +- {np.sqrt(np.mean(tw <= 0) * np.mean(tw > 0) / args.samples):.4f}")


if __name__ == "__main__":
    main()
