"""Slow textbook m-height oracles, independent of labpipe: test oracles and bench baselines.

For c = xG, sort |c_j| in descending order; h_m(c) = |c_(0)| / |c_(m)| and
h_m(G) = max over x != 0 of h_m(c).
"""

from itertools import combinations

import numpy as np
from scipy.optimize import linprog


def lp_m_height(G, m: int) -> float:
    """h_m(G) as the LP enumeration: max over T (|T| = n - m) and a outside T of

        max g_a . x   subject to   -1 <= g_j . x <= 1 for j in T,

    where g_j is column j of G. An unbounded LP means h_m(G) = inf.
    """
    G = np.asarray(G, dtype=np.float64)
    k, n = G.shape
    if m == 0:
        return 1.0
    best = 0.0
    for T in combinations(range(n), n - m):
        G_T = G[:, T].T
        constraints = np.vstack([G_T, -G_T])
        bounds = np.ones(2 * len(T))
        for a in sorted(set(range(n)) - set(T)):
            # Presolve off: HiGHS presolve can call an unbounded LP infeasible (seen with scipy 1.17
            # when T holds a zero column), though x = 0 is always feasible here.
            result = linprog(-G[:, a], A_ub=constraints, b_ub=bounds, bounds=[(None, None)] * k,
                             method="highs", options={"presolve": False})
            if result.status == 3:  # unbounded
                return float("inf")
            if result.status != 0:
                raise RuntimeError(f"LP for T={T}, a={a} failed: {result.message}")
            best = max(best, -result.fun)
    return best


def codeword_m_heights(codewords, m: int) -> np.ndarray:
    """h_m(c) for each row c, by the sorting definition (inf where |c|_(m) = 0)."""
    magnitudes = -np.sort(-np.abs(codewords), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return magnitudes[..., 0] / magnitudes[..., m]


def brute_force_lower_bound(G, m: int, samples: int, rng: np.random.Generator) -> float:
    """max of h_m(xG) over random Gaussian messages x: a lower bound on h_m(G)."""
    G = np.asarray(G, dtype=np.float64)
    messages = rng.standard_normal((samples, G.shape[0]))
    return float(np.max(codeword_m_heights(messages @ G, m)))
