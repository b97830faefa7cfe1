"""Exact m-heights of real linear codes, by vertex enumeration.

For a generator G (k x n, full row rank) and a codeword c = xG, sort |c_j| in
descending order; h_m(c) = |c_(0)| / |c_(m)|, and the m-height h_m(G) is the
maximum of h_m(c) over x != 0. Two facts make it computable exactly:

* h_m(G) is infinite exactly when m >= d, the minimum Hamming distance.
* For m < d, h_m(G) = max over column sets T (|T| = n - m) of max |c_a| subject
  to |c_j| <= 1 on T. Every such polytope is bounded and has its maximum at a
  vertex x = s G_S^-1, with S a k-subset whose block G_S is invertible and
  s in {+-1}^k. Conversely every such vertex gives a codeword, whose sorting
  score cannot exceed h_m(G), and the optimal vertex of each LP scores at least
  that LP's value (n - m of its coordinates are <= 1 in magnitude).

So the whole profile h_0..h_(n-1) is the maximum, over the candidate codewords
c = s G_S^-1 G, of sorted |c| ratios, with h_m set to infinity for m >= d.

Two implementations, chosen by device: on the CPU, labpipe.mheight.kernel (numba, the same LPs
at their dual vertices, threaded over codes); on a GPU, the enumeration below, batched in torch
float64. Both count a block G_S as invertible by numpy's rank rule.
"""

from __future__ import annotations

import functools
import itertools
import numbers

import numpy as np
import torch

from labpipe.device import resolve_device
from labpipe.mheight import kernel

EPS = float(np.finfo(np.float64).eps)


def systematic_generator(P) -> np.ndarray:
    """[I_k | P] from the k x (n - k) parity part P."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"P must be a 2-D (k, n-k) array, got shape {P.shape}")
    return np.hstack([np.eye(P.shape[0]), P])


# ---------------------------------------------------------------------------
# The torch path (GPUs): combinatorial tables, cached per shape


@functools.cache
def _column_subsets(n: int, size: int) -> np.ndarray:
    """All size-subsets of range(n), lexicographic, as a (C(n, size), size) index array."""
    return np.array(list(itertools.combinations(range(n), size)), dtype=np.int64).reshape(-1, size)


@functools.cache
def _subsets_then_rest(n: int, k: int) -> np.ndarray:
    """(C(n, k), n) column orders: each k-subset S, followed by the columns outside S."""
    subsets = _column_subsets(n, k)
    outside = ~np.eye(n, dtype=bool)[subsets].any(axis=1)
    rest = np.nonzero(outside)[1].reshape(len(subsets), n - k)
    return np.hstack([subsets, rest])


def _bitmasks(subsets: np.ndarray) -> np.ndarray:
    return (np.int64(1) << subsets).sum(axis=1)


@functools.cache
def _containment(n: int, k: int, z: int) -> np.ndarray:
    """(C(n, z), C(n, k)) 0/1 matrix: entry [Z, S] is 1 when k-subset S lies inside z-subset Z."""
    z_masks = _bitmasks(_column_subsets(n, z))
    k_masks = _bitmasks(_column_subsets(n, k))
    return ((k_masks[None, :] & ~z_masks[:, None]) == 0).astype(np.float64)


@functools.cache
def _sign_vectors(k: int) -> np.ndarray:
    """The 2^(k-1) sign vectors with first entry +1: s and -s give the same |c|."""
    tails = itertools.product((1.0, -1.0), repeat=k - 1)
    return np.array([(1.0, *tail) for tail in tails], dtype=np.float64)


# ---------------------------------------------------------------------------
# Validation


def _validated(G, ndim: int) -> np.ndarray:
    """G as a C-contiguous float64 (k, n) code or (B, k, n) batch, after the shape checks. Finiteness is checked
    by the implementation that runs (the kernel returns NOT_FINITE; _torch_profiles checks first)."""
    G = np.ascontiguousarray(G, dtype=np.float64)
    expected = "a 2-D (k, n) generator matrix" if ndim == 2 else "a 3-D (B, k, n) batch of generators"
    if G.ndim != ndim:
        raise ValueError(f"G must be {expected}, got shape {G.shape}")
    k, n = G.shape[-2:]
    if k == 0 or n == 0:
        raise ValueError(f"G must have at least one row and one column, got k={k}, n={n}")
    if k > n:
        raise ValueError(f"G has k={k} rows but only n={n} columns; a generator needs k <= n")
    return G


def _not_finite(code: int) -> ValueError:
    return ValueError(f"code {code} of G has NaN or infinite entries")


def _require_finite(G: np.ndarray) -> None:
    finite = np.isfinite(G).all(axis=(1, 2))
    if not finite.all():
        raise _not_finite(int(np.argmin(finite)))


def _validated_m(m, n: int) -> int:
    integral = type(m) is int or (isinstance(m, numbers.Integral) and not isinstance(m, bool))
    if not integral or not 0 <= m < n:
        raise ValueError(f"m must be an int in 0..{n - 1} (n={n}), got {m!r}")
    return int(m)


# ---------------------------------------------------------------------------
# The torch path's batched core: one chunk of codes at a time


def _split_columns(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every k-subset S: the block G_S, (b, C(n,k), k, k), and the other columns, (b, C(n,k), k, n-k)."""
    k, n = G.shape[1:]
    order = torch.as_tensor(_subsets_then_rest(n, k), device=G.device)
    columns = G[:, :, order].permute(0, 2, 1, 3)  # [b, S, i, j] = G[b, i, order[S, j]]
    return columns[..., :k], columns[..., k:]


def _invertible(blocks: torch.Tensor) -> torch.Tensor:
    """Which k x k blocks are invertible, by numpy's matrix_rank rule sigma_min > sigma_max * k * eps."""
    k = blocks.shape[-1]
    singular_values = torch.linalg.svdvals(blocks)
    return singular_values[..., -1] > singular_values[..., 0] * k * EPS


def _require_full_rank(invertible: torch.Tensor, first_code: int) -> None:
    # G has full row rank iff some k x k column block is invertible.
    rank_deficient = ~invertible.any(dim=1)
    if rank_deficient.any():
        code = first_code + int(rank_deficient.nonzero()[0, 0])
        raise ValueError(f"code {code} of G is not full row rank: no k x k column block is invertible")


def _minimum_distances(invertible: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Minimum Hamming distance per code, (b,) int64, from the invertible-block mask.

    d = n - (largest |Z| with rank(G_Z) < k). Sets smaller than k are always deficient;
    a set Z with |Z| >= k is deficient iff it contains no invertible k-subset. Deficiency
    is inherited by subsets, so the deficient sizes z >= k form a run k..z_max and
    d = n - k + 1 - (how many sizes z >= k have a deficient set).
    """
    invertible = invertible.to(torch.float64)
    distances = torch.full(invertible.shape[:1], n - k + 1, dtype=torch.int64, device=invertible.device)
    for z in range(k, n):  # z = n is full rank, checked before
        containment = torch.as_tensor(_containment(n, k, z), device=invertible.device)
        invertible_inside = invertible @ containment.T  # (b, C(n, z)) counts
        distances -= (invertible_inside == 0).any(dim=1).to(torch.int64)
    return distances


def _heights_chunk(G: torch.Tensor, first_code: int) -> torch.Tensor:
    """(b, n) m-height profiles of a chunk of validated codes G, (b, k, n)."""
    k, n = G.shape[1:]
    blocks, rest = _split_columns(G)
    invertible = _invertible(blocks)
    _require_full_rank(invertible, first_code)

    # Singular blocks get the identity so the batched solve cannot fail; they are masked below.
    identity = torch.eye(k, dtype=G.dtype, device=G.device)
    blocks = torch.where(invertible[..., None, None], blocks, identity)
    signs = torch.as_tensor(_sign_vectors(k), device=G.device)
    # A candidate c = s G_S^-1 G equals s on S exactly, so only the other n-k coordinates are solved for.
    # No sorting is needed: for m < d, h_m(G) = max over candidates with at most m coordinates above 1 of
    # max|c|. (>=: each T-LP optimum is such a candidate, its n-m coordinates on T being <= 1. <=: such a
    # candidate has |c|_(m) <= 1, so max|c| <= h_m(c) <= h_m(G).) A degenerate vertex has extra coordinates
    # equal to 1 up to rounding: counting only those above 1 + 1e-12 moves a value by at most 1e-12 relative.
    outside = (signs @ torch.linalg.solve(blocks, rest)).abs_()  # (b, subsets, signs, n-k)
    above_one = (outside > 1.0 + 1e-12).sum(dim=-1)  # in 0..n-k
    # The k coordinates on S are 1; with k = n there are no others.
    peak = (outside.amax(dim=-1) if n > k else outside.new_zeros(outside.shape[:-1])).clamp_(min=1.0)
    peak.masked_fill_(~invertible[..., None], 0.0)
    best_by_count = torch.zeros(len(G), n - k + 1, dtype=G.dtype, device=G.device)
    best_by_count.scatter_reduce_(1, above_one.flatten(1), peak.flatten(1), reduce="amax")
    heights = torch.full((len(G), n), torch.inf, dtype=G.dtype, device=G.device)
    heights[:, : n - k + 1] = best_by_count.cummax(dim=1).values

    distances = _minimum_distances(invertible, n, k)
    beyond_distance = torch.arange(n, device=G.device)[None, :] >= distances[:, None]
    heights[beyond_distance] = torch.inf
    heights[:, 0] = 1.0
    return heights


# ---------------------------------------------------------------------------
# Public API


def _raise_for(status: int, code: int) -> None:
    if status == kernel.NOT_FINITE:
        raise _not_finite(code)
    if status == kernel.NOT_FULL_RANK:
        raise ValueError(f"code {code} of G is not full row rank: no k x k column block is invertible")
    if status == kernel.OVERFLOW:
        raise ValueError(f"code {code} of G has entries too large for exact minors: a minor overflows float64")


def _cpu_profile(G: np.ndarray, m_low: int = 1) -> np.ndarray:
    """The kernel on one validated code (k, n): h_0 and h_m for m >= m_low."""
    heights = np.empty(G.shape[1])
    _raise_for(kernel.profile(G, *kernel.tables(G.shape[1], G.shape[0]), heights, m_low), code=0)
    return heights


def _torch_profiles(G: np.ndarray, device: torch.device, chunk: int) -> np.ndarray:
    """The torch enumeration on a validated batch (B, k, n), chunk codes at a time."""
    _require_finite(G)
    profiles = []
    for start in range(0, len(G), chunk):
        codes = torch.as_tensor(G[start:start + chunk], device=device)
        profiles.append(_heights_chunk(codes, start).cpu().numpy())
    return np.concatenate(profiles) if profiles else np.empty((0, G.shape[2]))


def m_heights_batch(G, device=None, chunk: int = 256) -> np.ndarray:
    """m-height profiles of a batch of codes: G (B, k, n) -> (B, n) float64, inf where m >= d.

    device: None (CPU), "cpu", "cuda", "cuda:N" or "auto". On the CPU the kernel threads over the
    codes (numba's thread count, all cores by default). On a GPU chunk codes are processed at once;
    a (10, 5) code holds C(10,5) * 2^4 * 5 float64 candidate coordinates (160 KB) per intermediate,
    so a GPU wants a large chunk, e.g. 4096.
    """
    G = _validated(G, ndim=3)
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    torch_device = resolve_device("cpu" if device is None else str(device))
    if torch_device.type != "cpu":
        return _torch_profiles(G, torch_device, chunk)
    heights = np.empty((len(G), G.shape[2]))
    status = np.empty(len(G), dtype=np.int64)
    kernel.profiles(G, *kernel.tables(G.shape[2], G.shape[1]), heights, status)
    failed = np.flatnonzero(status != kernel.OK)
    if failed.size:
        _raise_for(status[failed[0]], int(failed[0]))
    return heights


def m_heights(G) -> np.ndarray:
    """m-height profile (n,) of one code G (k, n): h_m for m = 0..n-1, inf where m >= d."""
    return _cpu_profile(_validated(G, ndim=2))


def m_height(G, m: int) -> float:
    """h_m(G) for one code G (k, n) and 0 <= m < n."""
    G = _validated(G, ndim=2)
    m = _validated_m(m, G.shape[1])
    return float(_cpu_profile(G, m_low=max(m, 1))[m])


def minimum_distance(G) -> int:
    """Minimum Hamming distance of the code generated by G (k, n): h_m is finite exactly for m < d."""
    return int(np.isfinite(m_heights(G)).sum())
