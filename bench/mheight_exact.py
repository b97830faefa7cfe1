"""Exact m-heights: labpipe's CPU kernel against the fastest public implementation, the LP, and the torch path.

    python bench/mheight_exact.py [--rounds 5] [--codes 100] [--shape-codes 2000] [--device cpu|cuda]

Random systematic codes [I | P], P integer in [-100, 100]. Timed side by side in this process, each figure
the best of --rounds interleaved rounds (the spread of the per-round ratios is printed beside it):

* the peer: analog-ecc-heights' C++ combinatorial backend (Eigen + OpenMP, one thread per core here), the
  full profile h_1..h_(d-1) of each of --codes (10, 5) codes, against labpipe's m_heights_batch (all at
  once) and m_heights (one code at a time). Its wheel is pure Python; the backend is built from source
  (needs Eigen, e.g. Debian's libeigen3-dev):
      pip install --no-binary analog-ecc-heights analog-ecc-heights -Cwheel.cmake=true
* the LP: tests/reference.lp_m_height, one (9, 5) code at m = 2, against labpipe's m_height;
* the current solver's values: the torch path (labpipe's solver before the kernel, kept for GPUs, run on
  --device) on every code of the bench, --shape-codes of each of the lab's six (n, k); where the two differ
  by more than 1e-12, tests/reference.exact_m_heights (rational arithmetic) says which one is off.
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import numba  # noqa: E402
import numpy as np  # noqa: E402

from labpipe.device import resolve_device  # noqa: E402
from labpipe.mheight import exact, m_height, m_heights, m_heights_batch, systematic_generator  # noqa: E402
from reference import exact_m_heights, lp_m_height  # noqa: E402

SHAPES = [(n, k) for n in (9, 10) for k in (4, 5, 6)]  # the lab's (n, k)
BARS = {"peer": 2.0, "lp": 10_000.0, "difference": 1e-12}


def random_codes(n: int, k: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([systematic_generator(rng.integers(-100, 101, (k, n - k))) for _ in range(count)])


def timed(function, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def largest_relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """max |v - r| / |r|, where equal infinities count as no difference."""
    same = values == reference
    with np.errstate(invalid="ignore"):
        difference = np.where(same, 0.0, np.abs(values - reference) / np.abs(reference))
    return float(np.nan_to_num(difference, nan=np.inf).max())


def cpp_combinatorial_profiles():
    """analog-ecc-heights' C++ h_1..h_(d-1) profiles of many codes (one thread per core), or None when its
    backend is not built."""
    try:
        import analog_ecc_heights
    except ImportError:
        return None
    if "cpp" not in analog_ecc_heights.available_backends():
        return None
    profile, threads = analog_ecc_heights.h_m_roth_primal_combinatorial, len(os.sched_getaffinity(0))
    return lambda codes: [profile(G, None, backend="cpp", num_threads=threads) for G in codes]


def side_by_side(functions: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions interleaved within each round, after one untimed round."""
    seconds = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(rounds):
        for name, function in functions.items():
            seconds[name].append(timed(function)[1])
    return seconds


def ratio_line(label: str, slow: list[float], fast: list[float], bar: float) -> str:
    per_round = np.array(slow) / np.array(fast)
    best = min(slow) / min(fast)
    verdict = "meets" if best >= bar else "MISSES"
    return (f"  {label}: {best:,.1f}x (rounds {per_round.min():,.1f}-{per_round.max():,.1f}x)"
            f"  bar >= {bar:,.0f}x: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; each figure is the best")
    parser.add_argument("--codes", type=int, default=100, help="(10, 5) codes against the peer")
    parser.add_argument("--shape-codes", type=int, default=2000, help="codes per lab (n, k) against the torch path")
    parser.add_argument("--device", default="cpu", help="where the torch path runs: cpu, cuda, cuda:N or auto")
    args = parser.parse_args()

    torch_device = resolve_device(args.device)
    cpp_profiles = cpp_combinatorial_profiles()
    m_heights_batch(random_codes(9, 5, 4, 0))  # warm-up: the kernel's compilation (or its cache), its threads
    print(f"cores={len(os.sched_getaffinity(0))} numba_threads={numba.get_num_threads()} "
          f"threading_layer={numba.threading_layer()} torch_path_device={torch_device} "
          f"peer_cpp_backend={'built' if cpp_profiles else 'NOT BUILT (see the docstring)'}")

    codes = random_codes(10, 5, args.codes, seed=0)
    print(f"\n(10, 5) full profiles, {args.codes} codes, seconds per code (best of {args.rounds} rounds):")
    functions = {"batch": lambda: m_heights_batch(codes), "single": lambda: [m_heights(G) for G in codes]}
    if cpp_profiles:
        functions["peer"] = lambda: cpp_profiles(codes)
    seconds = side_by_side(functions, args.rounds)
    print("  " + "  ".join(f"{name} {min(s) / len(codes):.2e}" for name, s in seconds.items()))
    if cpp_profiles:
        print(ratio_line("peer / m_heights_batch", seconds["peer"], seconds["batch"], BARS["peer"]))
        print(ratio_line("peer / m_heights one code at a time", seconds["peer"], seconds["single"], BARS["peer"]))
        labpipe = m_heights_batch(codes)
        pairs = list(zip(labpipe, cpp_profiles(codes), strict=True))  # the peer's h_1..h_(d-1)
        worst = max(largest_relative_difference(ours[1:len(theirs) + 1], np.array(theirs)) for ours, theirs in pairs)
        finite_as_peer = all(np.isfinite(ours).sum() == len(theirs) + 1 for ours, theirs in pairs)
        print(f"  values vs the peer: max rel diff {worst:.1e}, finite exactly where the peer's are: {finite_as_peer}")
    else:
        print("  the peer's C++ backend is not built: no ratio against it (build it as the docstring says)")

    G = random_codes(9, 5, 1, seed=0)[0]
    calls = 2000
    print("\n(9, 5) code, m = 2: the LP method (72 HiGHS LPs: 7 columns T, a outside) vs m_height, seconds per height:")
    seconds = side_by_side({"lp": lambda: lp_m_height(G, 2),
                            "m_height": lambda: [m_height(G, 2) for _ in range(calls)]}, args.rounds)
    seconds["m_height"] = [s / calls for s in seconds["m_height"]]
    print(f"  LP {min(seconds['lp']):.2e}  m_height {min(seconds['m_height']):.2e}"
          f"  (values {lp_m_height(G, 2):.12g} vs {m_height(G, 2):.12g})")
    print(ratio_line("LP / m_height", seconds["lp"], seconds["m_height"], BARS["lp"]))

    print(f"\nvalues vs the torch path (the current solver) on {args.device}: the codes above, then {args.shape_codes}"
          " per lab (n, k)")
    chunk = 256 if torch_device.type == "cpu" else 4096
    batches = [("the peer's (10,5)", codes), ("the LP's (9,5)", G[None])]
    batches += [(f"({n},{k})", random_codes(n, k, args.shape_codes, seed)) for seed, (n, k) in enumerate(SHAPES)]
    worst, off = 0.0, []  # off: (codes, code, m, kernel, torch path) where they differ by more than the bar
    for name, batch in batches:
        kernel, kernel_s = timed(m_heights_batch, batch)
        torch_path, torch_s = timed(exact._torch_profiles, batch, torch_device, chunk)
        difference = largest_relative_difference(kernel, torch_path)
        worst = max(worst, difference)
        with np.errstate(invalid="ignore"):
            off += [(batch, c, m, kernel[c, m], torch_path[c, m]) for c, m in
                    np.argwhere(np.abs(kernel - torch_path) > BARS["difference"] * np.abs(torch_path))]
        timing = (f" kernel {kernel_s / len(batch):.2e} s/code, torch path {torch_s / len(batch):.2e} s/code;"
                  if len(batch) > 1 else "")
        print(f"  {name} {len(batch)} codes:{timing} max rel diff {difference:.1e}, infinities in the same places:"
              f" {np.array_equal(np.isinf(kernel), np.isinf(torch_path))}")
    verdict = "meets" if worst <= BARS["difference"] else "MISSES"
    print(f"  largest relative difference to the torch path: {worst:.1e}  bar <= 1e-12: {verdict}")
    if off:  # which one is off, in exact rational arithmetic
        errors = np.array([[abs(value / float(exact_m_heights(batch[c])[m]) - 1) for value in (ours, theirs)]
                           for batch, c, m, ours, theirs in off[:30]])
        print(f"  {len(off)} heights differ by more than 1e-12; of {len(errors)} recomputed exactly, the kernel is the"
              f" correctly rounded exact value in {int((errors[:, 0] == 0).sum())}, off by at most"
              f" {errors[:, 0].max():.1e}; the torch path is off by {errors[:, 1].min():.1e}..{errors[:, 1].max():.1e}")

if __name__ == "__main__":
    main()
