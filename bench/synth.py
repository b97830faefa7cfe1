"""Tokens/s of synth's alias-table sampler vs inverse-CDF sampling, and of the stage's shard writing with 1 or 2
worker processes.

    python bench/synth.py [--block 4096] [--length 64] [--seconds 3] [--shards 64] [--shard-sequences 8192]
        [--quick]

Sampler: one process, one block of `--block` sequences of `--length` tokens at a time, on HMM.random(H, E) for
H = E = 200 and for the default pipeline's HMM (hmm.hidden_states x hmm.vocab_size of params.yaml). The
baselines draw the same states and tokens step by step, vectorized over the block the same way, by inverse CDF
on the cumulative rows: comparing u against the whole row (O(H) per draw), and np.searchsorted on the rows laid
end to end (O(log H) per draw). A token is one state and one symbol draw.

Stage: write_shards (sampling, permutation lookup, file writes, sha256) of `--shards` shards, H = E = 200, into a
temp directory, with workers = 1 and 2; best of 3 runs. Steady tokens/s runs from the first shard's completion to
the last's; end to end includes a run's start-up: alias tables and, with 2 workers, spawning processes that import
torch (about a second each on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.config import SynthParams, load_params  # noqa: E402
from labpipe.hmm import HMM  # noqa: E402
from labpipe.synth.generate import BlockSampler, ShardSpec, plan_shards, start_distribution, write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def whole_row_sampler(first: np.ndarray, transition: np.ndarray, emission: np.ndarray, length: int, block: int):
    """Inverse CDF, u compared against a whole cumulative row: the next state is the number of entries below u."""
    cum_first, cum_step, cum_emit = np.cumsum(first), np.cumsum(transition, 1), np.cumsum(emission, 1)
    last_state, last_symbol = len(first) - 1, emission.shape[1] - 1

    def sample(rng: np.random.Generator) -> np.ndarray:
        tokens = np.empty((length, block), dtype=np.int64)
        state = np.minimum((rng.random(block)[:, None] > cum_first).sum(1), last_state)
        for t in range(length):
            if t:
                state = np.minimum((rng.random(block)[:, None] > cum_step[state]).sum(1), last_state)
            tokens[t] = np.minimum((rng.random(block)[:, None] > cum_emit[state]).sum(1), last_symbol)
        return tokens

    return sample


def binary_search_sampler(first: np.ndarray, transition: np.ndarray, emission: np.ndarray, length: int,
                          block: int):
    """Inverse CDF by binary search: row i's cumulative sums shifted by i, all rows in one sorted array, so that
    one np.searchsorted of i + u draws from row i for the whole block."""
    def laid_end_to_end(rows: np.ndarray) -> np.ndarray:
        cum = np.cumsum(rows, 1)
        cum[:, -1] = 1  # no u falls past its row's end
        return (cum + np.arange(len(rows))[:, None]).ravel()

    step, emit, n_symbols = laid_end_to_end(transition), laid_end_to_end(emission), emission.shape[1]
    n_states = len(first)
    cum_first = np.cumsum(first)
    cum_first[-1] = 1

    def sample(rng: np.random.Generator) -> np.ndarray:
        tokens = np.empty((length, block), dtype=np.int64)
        state = np.searchsorted(cum_first, rng.random(block), side="right")
        for t in range(length):
            if t:
                state = np.searchsorted(step, state + rng.random(block), side="right") - state * n_states
            tokens[t] = np.searchsorted(emit, state + rng.random(block), side="right") - state * n_symbols
        return tokens

    return sample


def tokens_per_second(sample, tokens_per_call: int, seconds: float, repeats: int = 5) -> float:
    """The best of `repeats` windows of seconds / repeats: other processes on the machine only ever slow a
    window down."""
    rng = np.random.default_rng(0)
    sample(rng)  # warm-up: buffers, caches
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / repeats:
            sample(rng)
            calls += 1
        best = max(best, calls * tokens_per_call / elapsed)
    return best


def compare_samplers(states: int, symbols: int, args: argparse.Namespace) -> None:
    hmm = HMM.random(states, symbols, seed=0).without_ends()
    arrays = (start_distribution(hmm, "stationary"), hmm.transition.numpy(), hmm.emission.numpy())
    samplers = {"labpipe alias tables": BlockSampler(*arrays, length=args.length, block=args.block).sample,
                "inverse CDF, whole row": whole_row_sampler(*arrays, args.length, args.block),
                "inverse CDF, searchsorted": binary_search_sampler(*arrays, args.length, args.block)}
    rates = {name: tokens_per_second(sample, args.length * args.block, args.seconds)
             for name, sample in samplers.items()}
    print(f"\nH={states} E={symbols}, blocks of {args.block} sequences x {args.length} tokens, one process")
    ours = rates["labpipe alias tables"]
    for name, rate in rates.items():
        ratio = "" if name.startswith("labpipe") else f"   labpipe is {ours / rate:.1f}x faster"
        print(f"  {name:<26} {rate / 1e6:8.2f} M tokens/s{ratio}")


def write_rates(synth: SynthParams, hmm: HMM, workers: int) -> tuple[float, float]:
    """(end-to-end tokens/s, steady tokens/s) of writing the shards of synth. Steady: from the first shard's
    completion to the last's, counting the shards that other workers had not yet begun (a lower bound)."""
    planned = plan_shards(synth)
    with tempfile.TemporaryDirectory() as out_dir:
        spec = ShardSpec(start_distribution(hmm, "stationary"), hmm.transition.numpy(), hmm.emission.numpy(),
                         synth.seq_length, synth.block_sequences, Path(out_dir))
        start = time.perf_counter()
        completed = [time.perf_counter() for _ in write_shards(spec, planned, workers)]
    tokens = planned[0].tokens
    return (len(planned) * tokens / (completed[-1] - start),
            (len(planned) - workers) * tokens / (completed[-1] - completed[0]))


def compare_workers(args: argparse.Namespace) -> None:
    synth = dataclasses.replace(load_params(ROOT / "params.yaml").synth, seq_length=args.length,
                                sequences_per_shard=args.shard_sequences,
                                block_sequences=min(args.block, args.shard_sequences), train_shards=args.shards,
                                val_shards=0, permute_emissions=True)
    hmm = HMM.random(200, 200, seed=0).without_ends()
    print(f"\nstage: {args.shards} shards of {args.shard_sequences * args.length:,} tokens (H=200 E=200, "
          "permute_emissions) written with their sha256, best of 3 runs")
    steady = {}
    for workers in (1, 2):
        end_to_end, steady[workers] = (max(rates) for rates in zip(*(write_rates(synth, hmm, workers)
                                                                     for _ in range(3)), strict=True))
        print(f"  workers={workers}: {steady[workers] / 1e6:8.2f} M tokens/s steady, {end_to_end / 1e6:8.2f} M "
              "tokens/s end to end")
    print(f"  2 workers / 1, steady: {steady[2] / steady[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=4096, help="sequences sampled together (seed: 4096)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per sampler measurement")
    parser.add_argument("--shards", type=int, default=64, help="shards written for the worker comparison")
    parser.add_argument("--shard-sequences", type=int, default=8192, help="sequences per shard there")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    args = parser.parse_args()
    if args.quick:
        args.block, args.seconds, args.shards, args.shard_sequences = 512, 0.5, 6, 1024
    h = load_params(ROOT / "params.yaml").hmm
    # other processes share the cores: their load lowers every figure below, the 2-worker one most
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores before the bench")
    for states, symbols in ((200, 200), (h.hidden_states, h.vocab_size)):
        compare_samplers(states, symbols, args)
    compare_workers(args)


if __name__ == "__main__":
    main()
