"""Slow textbook m-height oracles, independent of labpipe: test oracles and bench baselines.

For c = xG, sort |c_j| in descending order; h_m(c) = |c_(0)| / |c_(m)| and
h_m(G) = max over x != 0 of h_m(c).
"""

from fractions import Fraction
from itertools import combinations, product

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


def exact_m_heights(G) -> list:
    """The profile h_0..h_(n-1) of an integer G in exact rational arithmetic (Fractions; inf for m >= d), by
    Roth's vertex enumeration: every k-subset S with det G_S != 0, every sign vector s, c = s G_S^-1 G; h_m is
    the largest max|c| over the candidates with at most m coordinates |c_j| > 1 (those outside S)."""
    G = np.asarray(G, dtype=np.float64)
    if not (G == np.round(G)).all():
        raise ValueError("exact_m_heights needs integer entries")
    k, n = G.shape
    G = [[Fraction(int(v)) for v in row] for row in G]
    best_by_count = [Fraction(0)] * (n - k + 1)
    invertible = set()
    for S in combinations(range(n), k):
        inverse_times_G = _solve_exactly([[G[i][j] for j in S] for i in range(k)], G)
        if inverse_times_G is None:
            continue
        invertible.add(S)
        for signs in product((1, -1), repeat=k - 1):
            s = (1, *signs)
            c = [sum(s[r] * inverse_times_G[r][j] for r in range(k)) for j in range(n)]
            outside = [abs(c[j]) for j in range(n) if j not in S]
            count = sum(v > 1 for v in outside)
            best_by_count[count] = max(best_by_count[count], max([Fraction(1), *outside]))
    # d = n - (largest column set without an invertible block)
    deficient = [z for z in range(k, n) for Z in combinations(range(n), z)
                 if not any(S in invertible for S in combinations(Z, k))]
    d = n - max(deficient, default=k - 1)  # at most n - k + 1
    return [Fraction(1)] + [max(best_by_count[:m + 1]) if m < d else float("inf") for m in range(1, n)]


def _solve_exactly(A, B):
    """A^-1 B for square A (Fractions) by Gauss-Jordan, or None when A is singular."""
    k = len(A)
    rows = [A[i][:] + B[i][:] for i in range(k)]
    for col in range(k):
        pivot = next((r for r in range(col, k) if rows[r][col] != 0), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(k):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [row[k:] for row in rows]
