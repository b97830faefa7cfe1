"""Exact m-heights against independent oracles: an LP enumeration, exact rational vertex enumeration,
analog-ecc-heights, brute force. Both implementations are checked: the CPU kernel (what m_heights runs here)
and the torch enumeration (the GPU path, run on the CPU)."""

from itertools import combinations

import analog_ecc_heights
import numpy as np
import pytest
import torch

from labpipe.mheight import exact, m_height, m_heights, m_heights_batch, minimum_distance, systematic_generator
from reference import brute_force_lower_bound, exact_m_heights, lp_m_height

KINDS = ("integer", "integer_with_zeros", "small_integer", "real", "non_systematic")


def make_code(n: int, k: int, kind: str, seed: int) -> np.ndarray:
    """[I | P] with P integer in [-100, 100] (optionally with zeros), in [-2, 2] (many exactly
    singular blocks and a small minimum distance), or real Gaussian; or a non-systematic
    full-rank G in [-2, 2] with a zero first column."""
    rng = np.random.default_rng(seed)
    if kind == "non_systematic":
        while True:
            G = rng.integers(-2, 3, (k, n)).astype(np.float64)
            G[:, 0] = 0.0
            if np.linalg.matrix_rank(G) == k:
                return G
    if kind == "real":
        return systematic_generator(rng.standard_normal((k, n - k)))
    if kind == "small_integer":
        return systematic_generator(rng.integers(-2, 3, (k, n - k)))
    P = rng.integers(-100, 101, (k, n - k))
    if kind == "integer_with_zeros":
        P[rng.random(P.shape) < 0.35] = 0
    return systematic_generator(P)


def mixed_codes(n: int, k: int, count: int) -> list[np.ndarray]:
    return [make_code(n, k, KINDS[seed % len(KINDS)], seed) for seed in range(count)]


def torch_heights_batch(codes, chunk: int = 256) -> np.ndarray:
    """The GPU path's torch enumeration, on the CPU."""
    return exact._torch_profiles(exact._validated(codes, ndim=3), torch.device("cpu"), chunk)


def both_paths(G) -> dict[str, np.ndarray]:
    return {"kernel": m_heights(G), "torch": torch_heights_batch(np.asarray(G, dtype=np.float64)[None])[0]}


def brute_force_minimum_distance(G: np.ndarray) -> int:
    """n - (largest column set Z with rank(G_Z) < k), trying every Z."""
    k, n = G.shape
    deficient_sizes = [
        size
        for size in range(n + 1)
        for Z in combinations(range(n), size)
        if size < k or np.linalg.matrix_rank(G[:, Z]) < k
    ]
    return n - max(deficient_sizes)


# ---------------------------------------------------------------------------
# Oracles


SMALL_CODES = [  # two kinds per shape, rotating
    (n, k, kind, seed)
    for seed, (n, k) in enumerate([(5, 2), (5, 3), (6, 2), (6, 3), (6, 4), (7, 3), (7, 4)])
    for kind in (KINDS[seed % len(KINDS)], KINDS[(seed + 2) % len(KINDS)])
]


@pytest.mark.parametrize("n,k,kind,seed", SMALL_CODES)
def test_every_m_matches_lp_enumeration(n, k, kind, seed):
    G = make_code(n, k, kind, seed)
    expected = [lp_m_height(G, m) for m in range(n)]
    for path, heights in both_paths(G).items():
        np.testing.assert_allclose(heights, expected, rtol=1e-9, err_msg=path)


EDGE_CODES = {
    "k=1": [[1.0, 2.0, -3.0, 0.5]],
    "k=n": np.eye(3),
    "zero_column": [[2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 3.0, -1.0]],
}


@pytest.mark.parametrize("G", EDGE_CODES.values(), ids=EDGE_CODES.keys())
def test_edge_shapes_match_lp_enumeration(G):
    G = np.asarray(G)
    expected = [lp_m_height(G, m) for m in range(G.shape[1])]
    for path, heights in both_paths(G).items():
        np.testing.assert_allclose(heights, expected, rtol=1e-9, err_msg=path)


INTEGER_CODES = [(n, k, kind, seed) for seed, (n, k) in enumerate([(5, 2), (6, 3), (7, 3), (7, 4), (8, 4), (9, 5)])
                 for kind in ("integer", "integer_with_zeros", "small_integer")]


@pytest.mark.parametrize("n,k,kind,seed", INTEGER_CODES)
def test_integer_codes_get_the_correctly_rounded_exact_heights(n, k, kind, seed):
    # Every minor of an integer P is exact in float64, so the kernel's heights are the exact rationals, rounded.
    G = make_code(n, k, kind, seed)
    np.testing.assert_array_equal(m_heights(G), [float(h) for h in exact_m_heights(G)])


def test_small_codes_cover_infinite_heights_below_the_singleton_bound():
    # Guard on the test data: some codes must have d < n - k + 1, so some finite-looking m are inf.
    assert any(minimum_distance(make_code(n, k, kind, seed)) < n - k + 1 for n, k, kind, seed in SMALL_CODES)


@pytest.mark.parametrize("n,k,kind,seed", [(5, 2, "real", 11), (6, 3, "integer_with_zeros", 12),
                                           (6, 4, "small_integer", 13)])
def test_every_m_matches_analog_ecc_primal_lp(n, k, kind, seed):
    G = make_code(n, k, kind, seed)
    expected = [analog_ecc_heights.h_m_roth_primal_lp(G, m, backend="python") for m in range(n)]
    np.testing.assert_allclose(m_heights(G), expected, rtol=1e-9)


@pytest.mark.parametrize("n,k,kind,seed", [(9, 4, "integer", 21), (9, 4, "integer_with_zeros", 22),
                                           (10, 5, "integer", 23), (10, 5, "integer_with_zeros", 24)])
def test_larger_codes_match_analog_ecc_combinatorial(n, k, kind, seed):
    G = make_code(n, k, kind, seed)
    # With m=None it returns the finite profile h_1..h_(d-1).
    finite_profile = analog_ecc_heights.h_m_roth_primal_combinatorial(G, None, backend="python")
    d = len(finite_profile) + 1
    heights = m_heights(G)
    assert minimum_distance(G) == d
    np.testing.assert_allclose(heights[1:d], finite_profile, rtol=1e-9)
    assert np.isinf(heights[d:]).all()


# ---------------------------------------------------------------------------
# Properties


def test_profile_starts_at_one_and_never_decreases():
    heights = m_heights_batch(np.stack(mixed_codes(8, 4, 40)))
    assert (heights[:, 0] == 1.0).all()
    assert (heights[:, 1:] >= heights[:, :-1]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_invariant_under_column_permutation_and_change_of_basis(kind):
    rng = np.random.default_rng(31)
    G = make_code(8, 4, kind, 32)
    expected = m_heights(G)
    np.testing.assert_allclose(m_heights(G[:, rng.permutation(8)]), expected, rtol=1e-9)
    np.testing.assert_allclose(m_heights(rng.standard_normal((4, 4)) @ G), expected, rtol=1e-9)


@pytest.mark.parametrize("n,k", [(6, 3), (7, 2), (8, 4), (8, 5)])
def test_infinite_exactly_from_the_brute_force_minimum_distance(n, k):
    codes = mixed_codes(n, k, 12)
    for path, profiles in (("kernel", m_heights_batch(np.stack(codes))), ("torch", torch_heights_batch(codes))):
        for G, heights in zip(codes, profiles, strict=True):
            d = brute_force_minimum_distance(G)
            assert minimum_distance(G) == d
            np.testing.assert_array_equal(np.isinf(heights), np.arange(n) >= d, err_msg=path)


@pytest.mark.parametrize("delta,distance", [(1e-13, 3), (2.0**-51, 2)])
def test_blocks_at_the_rank_rules_limit_are_decided_by_their_singular_values(delta, distance):
    # Block {2, 3} = [[1, 1], [1, 1 + delta]] has cond_2 ~ 4 / delta: for 1e-13 invertible by the rule
    # (sigma_min > sigma_max k eps), too close to its limit for the determinant to certify it; for 2^-51 singular,
    # though its determinant, delta, is not 0.
    G = systematic_generator([[1.0, 1.0], [1.0, 1.0 + delta]])
    assert brute_force_minimum_distance(G) == distance
    assert minimum_distance(G) == distance
    for path, heights in both_paths(G).items():
        np.testing.assert_array_equal(np.isinf(heights), np.arange(4) >= distance, err_msg=path)


@pytest.mark.parametrize("n,k", [(6, 3), (8, 4), (10, 5)])
def test_random_messages_never_beat_the_exact_height(n, k):
    rng = np.random.default_rng(41)
    for G in mixed_codes(n, k, 4):
        heights = m_heights(G)
        for m in range(n):
            assert brute_force_lower_bound(G, m, 20_000, rng) <= heights[m] * (1 + 1e-12)


def test_batch_matches_single_codes_across_chunks():
    codes = np.stack(mixed_codes(7, 3, 11))
    batch = m_heights_batch(codes)
    np.testing.assert_array_equal(batch, [m_heights(G) for G in codes])
    np.testing.assert_allclose(torch_heights_batch(codes, chunk=4), batch, rtol=1e-12)
    assert m_heights_batch(np.empty((0, 3, 7))).shape == (0, 7)
    assert torch_heights_batch(np.empty((0, 3, 7))).shape == (0, 7)


@pytest.mark.parametrize("n,k", [(9, 4), (9, 5), (9, 6), (10, 4), (10, 5), (10, 6)])
def test_torch_path_matches_the_kernel_on_the_lab_shapes(n, k):
    # The torch path solves each block by LU: its rounding grows with the block's condition number (up to ~3e-12
    # relative on integer (10, 5) codes, where the kernel is exact).
    codes = np.stack(mixed_codes(n, k, 40))
    kernel, torch_path = m_heights_batch(codes), torch_heights_batch(codes)
    np.testing.assert_array_equal(np.isinf(kernel), np.isinf(torch_path))
    np.testing.assert_allclose(kernel, torch_path, rtol=1e-10)


def test_m_height_reads_the_profile():
    G = make_code(7, 3, "integer_with_zeros", 51)
    assert [m_height(G, m) for m in range(7)] == list(m_heights(G))


def test_systematic_generator():
    P = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(systematic_generator(P), [[1, 0, 0, 1, 2], [0, 1, 3, 4, 5]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    codes = np.stack(mixed_codes(10, 5, 64))
    on_cuda, on_cpu = m_heights_batch(codes, device="cuda"), m_heights_batch(codes)
    np.testing.assert_array_equal(np.isinf(on_cuda), np.isinf(on_cpu))
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-10)  # the torch path's LU rounding, as on the CPU


# ---------------------------------------------------------------------------
# Validation


FULL_RANK = systematic_generator([[1.0, 2.0], [3.0, 4.0]])
RANK_ONE = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
WITH_NAN = np.where(FULL_RANK == 4, np.nan, FULL_RANK)
WITH_INF = np.where(FULL_RANK == 4, np.inf, FULL_RANK)


def batch_with(bad_code: np.ndarray, index: int) -> np.ndarray:
    codes = np.stack([FULL_RANK] * 3)
    codes[index] = bad_code
    return codes


@pytest.mark.parametrize("call,message", [
    (lambda: m_heights(np.ones(3)), r"2-D \(k, n\).*shape \(3,\)"),
    (lambda: m_heights_batch(FULL_RANK), r"3-D \(B, k, n\).*shape \(2, 4\)"),
    (lambda: minimum_distance(np.ones((4, 3))), r"k=4 rows but only n=3 columns"),
    (lambda: m_heights_batch(batch_with(WITH_NAN, 2)), r"code 2 .*NaN or inf"),
    (lambda: m_heights(WITH_INF), r"code 0 .*NaN or inf"),
    (lambda: m_heights_batch(np.stack([RANK_ONE, np.eye(2, 3)])), r"code 0 .*not full row rank"),
    (lambda: m_heights_batch(np.stack([np.eye(2, 3), RANK_ONE]), chunk=1), r"code 1 .*not full row rank"),
    (lambda: minimum_distance(RANK_ONE), r"not full row rank"),
    (lambda: torch_heights_batch(batch_with(WITH_NAN, 1)), r"code 1 .*NaN or inf"),
    (lambda: torch_heights_batch(np.stack([np.eye(2, 3), RANK_ONE])), r"code 1 .*not full row rank"),
    (lambda: m_heights(systematic_generator([[1e200, 1.0], [1.0, 1e200]])), r"code 0 .*too large.*overflows"),
    (lambda: m_heights_batch(np.stack([FULL_RANK]), chunk=0), r"chunk must be a positive int, got 0"),
    (lambda: m_height(FULL_RANK, 4), r"m must be an int in 0\.\.3 \(n=4\), got 4"),
    (lambda: m_height(FULL_RANK, -1), r"0\.\.3.*got -1"),
    (lambda: m_height(FULL_RANK, 1.0), r"0\.\.3.*got 1\.0"),
    (lambda: m_height(FULL_RANK, True), r"0\.\.3.*got True"),
    (lambda: systematic_generator(np.ones(3)), r"P must be a 2-D \(k, n-k\) array, got shape \(3,\)"),
])
def test_invalid_input_says_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
