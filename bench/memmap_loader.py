"""Batches/s of lm_train's loader (memmapped shards, row by row) vs the train steps/s of the model it feeds.

    python bench/memmap_loader.py [--quick] [--batches 2000] [--steps 50] [--workers 0 2]

Temporary shards of random tokens in the shape of params.yaml's synth section (sequences_per_shard rows of
seq_length tokens, train_shards shards, uint16); the model is params.yaml's lm model, trained on CPU with the
stage's AdamW and loss. Both are measured in this one process, one after the other, after a warm-up (the
first batch, which forks the workers; the first steps). The loader should outrun the model by 10x or more,
so that the data never is what training waits for.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.config import load_params  # noqa: E402
from labpipe.files import sha256_file  # noqa: E402
from labpipe.lm.data import ShardDataset, training_batches  # noqa: E402
from labpipe.lm.train import build_model, causal_lm_loss, parameter_groups  # noqa: E402
from labpipe.synth.manifest import Shard, load_manifest, write_manifest  # noqa: E402

VOCAB = 100  # the default HMM's vocabulary (hmm.vocab_size)


def write_shards(directory: Path, shards: int, rows: int, length: int) -> Path:
    """Random-token shards and their manifest; returns the manifest's path."""
    rng = np.random.default_rng(0)
    listed = []
    for index in range(shards):
        file = f"train_{index:05d}.bin"
        rng.integers(0, VOCAB, size=(rows, length)).astype("<u2").tofile(directory / file)
        listed.append(Shard("train", index, file, rows * length, rows, sha256_file(directory / file), index, ()))
    header = {"dtype": "<u2", "vocab_size": VOCAB, "seq_length": length, "sequences_per_shard": rows,
              "start": "stationary", "permute_emissions": False, "block_sequences": rows,
              "hmm": {"path": "", "sha256": "", "hidden_states": 0}, "out_dir": str(directory)}
    write_manifest(directory / "manifest.json", header, listed)
    return directory / "manifest.json"


def loader_batches_per_second(dataset: ShardDataset, batch_size: int, workers: int, batches: int) -> float:
    """Over `batches` batches of the endless training stream (epoch boundaries and their new workers included)."""
    stream = training_batches(dataset, batch_size, seed=0, num_workers=workers)
    next(stream)  # warm-up: workers forked, first pages read
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches / (time.perf_counter() - start)


def model_steps_per_second(lm, batch: torch.Tensor, steps: int) -> float:
    """The stage's step on CPU: forward with labels, backward, clip, AdamW."""
    torch.manual_seed(0)
    model = build_model(lm, VOCAB)
    optimizer = torch.optim.AdamW(parameter_groups(model, lm.weight_decay), lr=lm.lr,
                                  betas=(lm.adam_beta1, lm.adam_beta2))

    def step() -> None:
        loss = causal_lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lm.grad_clip)
        optimizer.step()
        loss.item()

    for _ in range(3):  # warm-up: allocator, kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000, help="loader batches timed per worker count")
    parser.add_argument("--steps", type=int, default=50, help="model train steps timed")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--quick", action="store_true", help="200 batches, 10 steps")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.steps = 200, 10

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    synth, lm = params.synth, params.lm
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(write_shards(Path(tmp), synth.train_shards, synth.sequences_per_shard,
                                              synth.seq_length))
        dataset = ShardDataset(manifest, "train")
        loader = {workers: loader_batches_per_second(dataset, lm.batch_size, workers, args.batches)
                  for workers in args.workers}
        model = model_steps_per_second(lm, next(training_batches(dataset, lm.batch_size, 0, 0))[0], args.steps)

    size = sum(p.numel() for p in build_model(lm, VOCAB).parameters())
    print(f"{synth.train_shards} shards x {synth.sequences_per_shard} rows x {synth.seq_length} tokens (uint16); "
          f"batch {lm.batch_size}; model: Llama d={lm.hidden_size} x {lm.layers} layers ({size:,} parameters), "
          f"CPU, {torch.get_num_threads()} threads")
    print(f"model train steps:       {model:10.1f} steps/s")
    for workers, rate in loader.items():
        print(f"loader, {workers} workers:       {rate:10.1f} batches/s   ratio {rate / model:7.1f}x the model")


if __name__ == "__main__":
    main()
