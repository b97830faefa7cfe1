"""Exact m-heights: the LP enumeration baseline against labpipe's batched vertex enumeration.

    python bench/mheight_exact.py [--codes 2000] [--lp-codes 3] [--device cpu|cuda] [--chunk 256]

Random systematic codes [I | P], P integer in [-100, 100]. The LP baseline (tests/reference.py)
solves the chosen m of a few codes; labpipe computes the whole profile h_0..h_(n-1) of every
code. When analog-ecc-heights has its C++ backend, its combinatorial profile is timed too.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import numpy as np  # noqa: E402

from labpipe.mheight import m_heights_batch, systematic_generator  # noqa: E402
from reference import lp_m_height  # noqa: E402

# (n, k) -> every m of the lab's groups: the LP solves the same profile that labpipe reports in one pass.
LP_HEIGHTS = {(n, k): tuple(range(2, n - k + 1)) for n in (9, 10) for k in (4, 5, 6)}


def random_codes(n: int, k: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([systematic_generator(rng.integers(-100, 101, (k, n - k))) for _ in range(count)])


def timed(function, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def lp_heights(codes, ms) -> np.ndarray:
    return np.array([[lp_m_height(G, m) for m in ms] for G in codes])


def largest_relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """max |v - r| / |r|, where equal infinities count as no difference."""
    same = values == reference
    with np.errstate(invalid="ignore"):
        difference = np.where(same, 0.0, np.abs(values - reference) / np.abs(reference))
    return float(np.nan_to_num(difference, nan=np.inf).max())


def cpp_combinatorial_profiles():
    """analog-ecc-heights' C++ h_1..h_(d-1) profiles of many codes, or None when its backend is not built."""
    try:
        import analog_ecc_heights
    except ImportError:
        return None
    if "cpp" not in analog_ecc_heights.available_backends():
        return None
    profile = analog_ecc_heights.h_m_roth_primal_combinatorial
    return lambda codes: [profile(G, None, backend="cpp") for G in codes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=2000, help="codes per (n, k) through labpipe")
    parser.add_argument("--lp-codes", type=int, default=2, help="of those, how many also go through the LP")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--chunk", type=int, default=None, help="codes per batch (default: labpipe's)")
    args = parser.parse_args()

    chunk = {} if args.chunk is None else {"chunk": args.chunk}
    cpp_profiles = cpp_combinatorial_profiles()
    print(f"device={args.device} codes={args.codes} lp_codes={args.lp_codes} "
          f"cpp_backend={'yes' if cpp_profiles else 'not built'}")
    for seed, ((n, k), ms) in enumerate(LP_HEIGHTS.items()):
        codes = random_codes(n, k, args.codes, seed)
        m_heights_batch(codes[:8], device=args.device, **chunk)  # warm-up: tables, kernels, CUDA context

        expected, lp_seconds = timed(lp_heights, codes[:args.lp_codes], ms)
        heights, labpipe_seconds = timed(m_heights_batch, codes, device=args.device, **chunk)
        lp_per_code, labpipe_per_code = lp_seconds / args.lp_codes, labpipe_seconds / args.codes
        difference = largest_relative_difference(heights[:args.lp_codes, list(ms)], expected)

        line = (f"(n,k)=({n},{k}) m={ms}: LP {lp_per_code:.3e} s/code"
                f" | labpipe {labpipe_per_code:.3e} s/code"
                f" | LP/labpipe {lp_per_code / labpipe_per_code:,.0f}x | max rel diff {difference:.1e}")
        if cpp_profiles:
            cpp_codes = codes[:200]
            _, cpp_seconds = timed(cpp_profiles, cpp_codes)
            cpp_per_code = cpp_seconds / len(cpp_codes)
            line += f" | cpp {cpp_per_code:.3e} s/code, cpp/labpipe {cpp_per_code / labpipe_per_code:.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
