"""Tokens/s and peak memory of one EM epoch: the torch backend vs pomegranate's DenseHMM (the seed's).

    python bench/hmm_em.py [--sequences 512] [--quick] [--device cpu] [--memory-budget-gb 8]

Same sequences (uniform random symbols, fixed length), same initial parameters, one M-step at the end of the
epoch, so both report the log-likelihood of all the data under the initial parameters whatever their batch
size. Each backend runs in a fresh subprocess, so that its RSS high-water mark (torch's allocator is
invisible to tracemalloc) or CUDA peak belongs to it alone. pomegranate materializes a (B, L, H, H) tensor:
where estimate_memory_bytes says batch 256 would not fit the budget, it runs at the largest batch that does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.device import resolve_device  # noqa: E402
from labpipe.hmm import BACKENDS, HMM, em_epoch, estimate_memory_bytes, pad_batches  # noqa: E402

EPS = 1e-14
GB = 1e9


def rss_high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    """One epoch of one backend; prints a JSON line."""
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    sequences = list(rng.integers(0, args.symbols, size=(args.sequences, args.length)))
    batches = list(pad_batches(sequences, args.batch))
    backend = BACKENDS[args.worker](HMM.random(args.states, args.symbols, seed=0), device)
    baseline = rss_high_water_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)

    start = time.perf_counter()
    result = em_epoch(backend, batches, update_freq=len(batches), eps=EPS, epoch=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_high_water_bytes() - baseline
    print(json.dumps({"tokens_per_s": result.n_tokens / seconds, "seconds": seconds, "peak_bytes": peak,
                      "rss_bytes": rss_high_water_bytes(), "log_likelihood": result.log_likelihood}))


def run_worker(backend: str, states: int, symbols: int, batch: int, args: argparse.Namespace,
               timeout: float | None = None) -> dict:
    """worker()'s figures for one backend, run in a fresh process (args: length, sequences, device)."""
    command = [sys.executable, __file__, "--worker", backend, "--states", str(states), "--symbols", str(symbols),
               "--batch", str(batch), "--length", str(args.length), "--sequences", str(args.sequences),
               "--device", args.device]
    completed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def largest_batch_that_fits(states: int, symbols: int, batch: int, length: int, budget: float) -> int:
    while batch > 1 and estimate_memory_bytes("pomegranate", states, symbols, batch, length) > budget:
        batch -= 1
    return batch


def compare(states: int, symbols: int, args: argparse.Namespace) -> None:
    budget = args.memory_budget_gb * GB
    seed_batch = largest_batch_that_fits(states, symbols, args.batch, args.length, budget)
    needed = estimate_memory_bytes("pomegranate", states, symbols, args.batch, args.length)
    print(f"\nH={states} E={symbols}, {args.sequences} sequences of length {args.length}, device {args.device}")
    if seed_batch < args.batch:
        print(f"  pomegranate at batch {args.batch} would need ~{needed / GB:.1f} GB (estimate_memory_bytes) > "
              f"budget {args.memory_budget_gb:g} GB: it runs at batch {seed_batch} (estimate "
              f"{estimate_memory_bytes('pomegranate', states, symbols, seed_batch, args.length) / GB:.2f} GB)")
    runs = {"pomegranate": (seed_batch, run_worker("pomegranate", states, symbols, seed_batch, args)),
            "torch": (args.batch, run_worker("torch", states, symbols, args.batch, args))}
    peak_kind = "CUDA max allocated" if args.device.startswith("cuda") else "RSS high-water above start"
    for name, (batch, run) in runs.items():
        estimate = estimate_memory_bytes(name, states, symbols, batch, args.length)
        print(f"  {name:<11} batch {batch:>3}: {run['tokens_per_s']:>12,.0f} tokens/s ({run['seconds']:.2f} s)  "
              f"peak {run['peak_bytes'] / 1e6:>8,.0f} MB ({peak_kind}; process RSS {run['rss_bytes'] / 1e6:,.0f} MB, "
              f"estimate {estimate / 1e6:,.0f} MB)  log-likelihood {run['log_likelihood']:.10f}")
    ours, seed = runs["torch"][1], runs["pomegranate"][1]
    difference = abs(ours["log_likelihood"] - seed["log_likelihood"]) / abs(seed["log_likelihood"])
    print(f"  torch / pomegranate: {ours['tokens_per_s'] / seed['tokens_per_s']:.1f}x tokens/s, "
          f"{ours['peak_bytes'] / seed['peak_bytes']:.4f}x peak memory "
          f"(whole process: {ours['rss_bytes'] / seed['rss_bytes']:.3f}x), "
          f"log-likelihood relative difference {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="what pomegranate may use")
    parser.add_argument("--worker", choices=sorted(BACKENDS), help=argparse.SUPPRESS)
    parser.add_argument("--states", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--symbols", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [(100, 100), (500, 200)]
    if args.quick:
        args.sequences, args.batch, args.length = min(args.sequences, 64), min(args.batch, 32), min(args.length, 30)
        sizes = [(20, 20), (50, 40)]
    for states, symbols in sizes:
        compare(states, symbols, args)


if __name__ == "__main__":
    main()
