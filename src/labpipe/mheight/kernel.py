"""The CPU kernel of labpipe.mheight.exact, compiled by numba: Roth's LPs solved at their dual vertices.

h_m(G) (m >= 1) is the largest value of the LP "max c_a subject to |c_j| <= 1 on T" over column sets T
of n - m columns and columns a outside T (tests/reference.py solves exactly these LPs). When G_T has
rank k, LP duality makes that value min ||y||_1 subject to G_T y = g_a, attained at a basis I of T:

    h_m(G) = max over |T| = n - m, a not in T, of  F(T, a),   F(T, a) = min over invertible I in T of w(I, a)
    w(I, a) = ||G_I^-1 g_a||_1 = sum over i in I of |det G_(I - i + a)| / |det G_I|       (Cramer's rule)

and a T with no invertible k-subset (rank < k, so m >= d) gives F = min over nothing = inf, h_m = inf.
For G = [I | P], det G_S is a minor of P (rows: the identity columns missing from S; columns: S's P
columns), so one code needs every minor of P, by Laplace expansion along the first row, one product
per term. Then F(I, a) = w(I, a) for the k-sets, F(Z, a) = min over b in Z of F(Z - b, a) for larger
ones, and h_m is the max of F over |Z| = n - m. For integer P (the lab's: |p| <= 100, minors up to
5 x 5, every partial sum below 2^41) every minor is an exact integer in float64, so every w, and every
height, is the correctly rounded exact value. A G that is not systematic is brought to [I | P] first (a
change of basis and a column order: heights change with neither) by Gauss-Jordan elimination with
complete pivoting.

Which blocks count as invertible is exact.py's rule, sigma_min > sigma_max * k * eps, on G's own
columns. The determinant certifies most blocks: cond_2(A) = sigma_1 prod_(i<k) sigma_i / |det A|, and
sigma_1 <= ||A||_F with AM-GM on the k-1 largest give cond_2(A)^2 <= ||A||_F^(2k) / ((k-1)^(k-1) det(A)^2).
A block not certified (within CERTAIN of the limit) is decided by its singular values; a zero
determinant is singular.

The combinatorics depend on (n, k) only and are tables built once per shape (tables()); the kernel is
arithmetic over them.
"""

import functools
import itertools

import numba
import numpy as np

EPS = float(np.finfo(np.float64).eps)
CERTAIN = 2.0**-10  # a bound below CERTAIN x the rule's limit is beyond the rounding of the determinant

OK, NOT_FINITE, NOT_FULL_RANK, OVERFLOW = 0, 1, 2, 3  # what profile() returns


@functools.cache
def tables(n: int, k: int) -> tuple[np.ndarray, ...]:
    """The index tables of one shape for profile(), unsigned (numba then skips negative-index checks):

    blocks (C(n,k), k): the k-subsets S, ordered by how many P columns (columns >= k) they hold;
    q_start: blocks of q P columns are q_start[q]:q_start[q+1]; the first one is the identity block;
    terms (T, 3): each block's q Laplace terms in order, as (block, row, column): the t-th is
        (-1)^t G[row, column] minor[block], row being the first identity column missing from S;
    base (C(n,k)(n-k), 1 + k): the pairs (I, a), a outside I, as I and the k blocks I - i + a;
    size_start: the pairs (Z, a) with |Z| = z are size_start[z]:size_start[z+1], the (I, a) first;
    children: the z pairs (Z - b, a) of each pair (Z, a) with |Z| = z > k, in order.
    """
    def q(S):
        return sum(c >= k for c in S)

    blocks = sorted(itertools.combinations(range(n), k), key=lambda S: (q(S), S))
    block_index = {S: b for b, S in enumerate(blocks)}
    q_start = np.searchsorted([q(S) for S in blocks], np.arange(min(k, n - k) + 2))
    terms = []
    for S in blocks:
        row = min({*range(k)} - {*S}, default=None)
        terms += [(block_index[tuple(sorted({*S, row} - {c}))], row, c) for c in S if c >= k]

    pairs = [(frozenset(S), a) for S in blocks for a in range(n) if a not in S]
    base = [[block_index[tuple(sorted(S))]] + [block_index[tuple(sorted(S - {i} | {a}))] for i in sorted(S)]
            for S, a in pairs]
    pair_index = {pair: p for p, pair in enumerate(pairs)}
    size_start, children = [0] * (k + 1) + [len(pairs)], []
    for size in range(k + 1, n + 1):
        for Z in map(frozenset, itertools.combinations(range(n), size)):
            for a in (a for a in range(n) if a not in Z):
                children += [pair_index[(Z - {b}, a)] for b in sorted(Z)]
                pair_index[(Z, a)] = len(pair_index)
        size_start.append(len(pair_index))
    def table(values, width=None):
        values = np.array(values, dtype=np.uint64)
        return values.reshape(-1, width) if width else values

    return table(blocks, k), table(q_start), table(terms, 3), table(base, k + 1), table(size_start), table(children)


@numba.njit(cache=True)
def _systematic(G):
    """(P-form code, its column order in G, |det G_S0|): G itself when it is [I | P]; else, by Gauss-Jordan with
    complete pivoting, G_S0^-1 G with its columns in the order S0, then the rest (|det G_S0| = 0: rank < k)."""
    k, n = G.shape
    order = np.arange(n)
    systematic = True
    for i in range(k):
        for j in range(k):
            systematic &= G[i, j] == (i == j)
    if systematic:
        return G, order, 1.0
    tableau = G.copy()
    used = np.zeros(n, dtype=np.bool_)
    determinant = 1.0
    for p in range(k):
        row, column = p, -1
        for r in range(p, k):
            for c in range(n):
                if not used[c] and (column < 0 or abs(tableau[r, c]) > abs(tableau[row, column])):
                    row, column = r, c
        if tableau[row, column] == 0.0:
            return G, order, 0.0
        for c in range(n):
            tableau[p, c], tableau[row, c] = tableau[row, c], tableau[p, c]
        determinant *= abs(tableau[p, column])
        tableau[p] /= tableau[p, column]
        for r in range(k):
            if r != p:
                tableau[r] -= tableau[r, column] * tableau[p]
        order[p] = column
        used[column] = True
    order[k:] = np.flatnonzero(~used)
    code = tableau[:, order].copy()
    code[:, :k] = np.eye(k)
    return code, order, determinant


@numba.njit(cache=True)
def _invertible_by_svd(G, columns):
    singular_values = np.linalg.svd(G[:, columns])[1]
    return singular_values[-1] > singular_values[0] * len(columns) * EPS


@numba.njit(cache=True)
def profile(G, blocks, q_start, terms, base, size_start, children, heights, m_low):
    """h_m for m >= m_low >= 1 of one validated code G (k, n) into heights (n,), h_0 = 1 (h_1..h_(m_low - 1) are
    not written), from tables(n, k). Returns OK, NOT_FINITE, NOT_FULL_RANK or OVERFLOW (a minor beyond float64)."""
    k, n = G.shape
    for r in range(k):
        for c in range(n):
            if not np.isfinite(G[r, c]):
                return NOT_FINITE
    code, order, scale = _systematic(G)  # |det G_S| = |minor(S)| * scale, S a column set of `code`
    if scale == 0.0:
        return NOT_FULL_RANK
    minors = np.empty(len(blocks))  # of P, one per block, from the smaller ones
    minors[0] = 1.0  # the identity block's
    t = 0
    for q in range(1, len(q_start) - 1):
        for b in range(q_start[q], q_start[q + 1]):
            total, sign = 0.0, 1.0
            for _ in range(q):
                block, row, column = terms[t]
                total += sign * code[row, column] * minors[block]
                sign, t = -sign, t + 1
            minors[b] = total
            if not np.isfinite(total):
                return OVERFLOW

    norms = np.zeros(n)
    for c in range(n):
        for r in range(k):
            norms[c] += G[r, order[c]] ** 2
    limit = (CERTAIN / (k * EPS)) ** 2 * float(k - 1) ** (k - 1)
    invertible = np.zeros(len(blocks), dtype=np.bool_)
    for b in range(len(blocks)):
        if minors[b] != 0.0:
            frobenius = 0.0
            for c in blocks[b]:
                frobenius += norms[c]
            power = 1.0  # frobenius**k, a pow() call slower than k products
            for _ in range(k):
                power *= frobenius
            invertible[b] = (power < limit * (minors[b] * scale) ** 2
                             or _invertible_by_svd(G, order[blocks[b]]))
    if not invertible.any():
        return NOT_FULL_RANK

    heights[n - k + 1:] = np.inf
    largest = n - min(m_low, n - k)  # h_m for m >= m_low needs the sets Z of up to n - m_low columns
    F = np.empty(size_start[largest + 1])  # F(Z, a) of every pair, by |Z|; h_(n - |Z|) is their max
    best = 0.0
    for p in range(size_start[k + 1]):  # |Z| = k: F(I, a) = w(I, a), inf when I is singular
        block = base[p, 0]
        if invertible[block]:
            total = 0.0
            for i in range(1, k + 1):
                total += abs(minors[base[p, i]])
            F[p] = total / abs(minors[block])
        else:
            F[p] = np.inf
        best = max(best, F[p])
    heights[n - k] = best
    c = 0
    for size in range(k + 1, largest + 1):  # F(Z, a) = min over b in Z of F(Z - b, a)
        best = 0.0
        for p in range(size_start[size], size_start[size + 1]):
            value = np.inf
            for _ in range(size):
                value = min(value, F[children[c]])
                c += 1
            F[p] = value
            best = max(best, value)
        heights[n - size] = best
    heights[0] = 1.0
    return OK


@numba.njit(cache=True, parallel=True)
def profiles(G, blocks, q_start, terms, base, size_start, children, heights, status):
    """profile() of every code of G (B, k, n) into heights (B, n) and status (B,), threaded over codes."""
    for b in numba.prange(G.shape[0]):
        status[b] = profile(G[b], blocks, q_start, terms, base, size_start, children, heights[b], 1)
