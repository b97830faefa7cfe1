"""Crosscoder training steps/s fed by the activation buffer vs by rows already in memory; rows/s of the buffer alone.

    python bench/crosscoder.py [--rows 131072 --d 256 --dict-size 2048 --batch 1024 --steps 50 --workers 0 2
                                --dtype float16 --device auto --repeats 5] [--quick]

Both training runs do the same Adam steps (crosscoder.train.train_step, same init) on the same batches
(ShuffledBatches' order). "memory": the whole buffer as normalized float32 on the device, each batch indexed
there, the indices made beforehand. "buffer": BatchStream, i.e. memmap -> background thread (-> DataLoader
workers) -> device, as crosscoder_train runs. Goal: the buffer costs < 10% of the in-memory steps/s.
The buffer alone: rows/s of BatchStream with no training, the file in the page cache (warm) and evicted from
it first (cold: posix_fadvise DONTNEED, every row read from the disk at random). Training figures are the best
(and the median) of --repeats runs, the runs alternating, so that load from other processes (the 2 cores of a
shared machine) penalizes neither side more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.config import load_params  # noqa: E402
from labpipe.crosscoder.buffer import DATA, ActivationBuffer, BatchStream, ShuffledBatches, write_buffer  # noqa: E402
from labpipe.crosscoder.model import Crosscoder  # noqa: E402
from labpipe.crosscoder.train import train_step  # noqa: E402
from labpipe.device import resolve_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10  # steps before the clock starts: allocator, threads and the first batches in flight


def make_buffer(directory: Path, rows: int, d: int, dtype: str) -> ActivationBuffer:
    rng = np.random.default_rng(0)

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            yield (torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)),
                   torch.from_numpy(3 * rng.standard_normal((n, d), dtype=np.float32)))

    write_buffer(directory, chunks(), rows, d, d, dtype, {"bench": True})
    return ActivationBuffer.open(directory)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_s(batches: Iterator[torch.Tensor], buffer: ActivationBuffer, c, steps: int,
                device: torch.device) -> float:
    model = Crosscoder(buffer.d_a, buffer.d_b, c.dict_size)
    model.init_weights(c.init, c.transpose_init, c.dec_init_norm, torch.Generator().manual_seed(0))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    for _ in range(WARMUP):
        train_step(model, optimizer, next(batches), c.lr, c.l1_coef, c)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, next(batches), c.lr, c.l1_coef, c)
    sync(device)
    return steps / (time.perf_counter() - started)


def in_memory(buffer: ActivationBuffer, c, total: int, device: torch.device) -> Iterator[torch.Tensor]:
    data = buffer.to_float(torch.from_numpy(np.array(buffer.array()).view(np.int16)).to(device),
                           buffer.scale_vector(device))
    dataset = ShuffledBatches(buffer, c.batch_size, c.seed)
    indices = [torch.from_numpy(dataset.rows_of(i)).to(device) for i in range(total)]
    return (data[index] for index in indices)


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (they are clean: written and fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rows_per_s(buffer: ActivationBuffer, c, batches: int, workers: int, device: torch.device) -> float:
    with BatchStream(buffer, c.batch_size, c.seed, 0, batches, workers, device) as stream:
        started = time.perf_counter()
        rows = sum(len(x) for x in stream)
        sync(device)
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--d", type=int, default=256, help="width of each source (d_a = d_b)")
    parser.add_argument("--dict-size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.d, args.dict_size, args.batch, args.steps, args.repeats = 16384, 64, 512, 256, 30, 2
    device = resolve_device(args.device)
    c = load_params(REPO / "params.yaml", [f"crosscoder.dict_size={args.dict_size}",
                                           f"crosscoder.batch_size={args.batch}"]).crosscoder
    total = WARMUP + args.steps

    with tempfile.TemporaryDirectory() as tmp:
        buffer = make_buffer(Path(tmp) / "buffer", args.rows, args.d, args.dtype)
        size = (buffer.directory / DATA).stat().st_size
        print(f"buffer {args.rows:,} rows x ({args.d} + {args.d}) {args.dtype} = {size / 2**20:,.0f} MiB; "
              f"F={args.dict_size}, batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}, "
              f"{args.repeats} runs each")
        memory, from_buffer = [], {w: [] for w in args.workers}
        for _ in range(args.repeats):
            memory.append(steps_per_s(in_memory(buffer, c, total, device), buffer, c, args.steps, device))
            for workers in args.workers:
                with BatchStream(buffer, c.batch_size, c.seed, 0, total, workers, device) as stream:
                    from_buffer[workers].append(steps_per_s(stream, buffer, c, args.steps, device))
        baseline, typical = max(memory), float(np.median(memory))
        print(f"  training, rows in memory        {baseline:9.1f} steps/s (median {typical:.1f}), "
              f"{baseline * args.batch:,.0f} rows/s")
        for workers, runs in from_buffer.items():
            best, median = max(runs), float(np.median(runs))
            print(f"  training, from the buffer, {workers} wk {best:9.1f} steps/s (median {median:.1f}), buffer cost "
                  f"{1 - best / baseline:+.1%} (medians {1 - median / typical:+.1%}) of the in-memory steps/s "
                  "(goal < 10%)")

        batches = max(1, min(buffer.rows // args.batch, 2000))
        for workers in args.workers:
            warm = max(rows_per_s(buffer, c, batches, workers, device) for _ in range(args.repeats))
            cold = []
            for _ in range(args.repeats):
                evict(buffer.directory / DATA)
                cold.append(rows_per_s(buffer, c, batches, workers, device))
            print(f"  buffer alone, {workers} wk: {warm:12,.0f} rows/s from the page cache, {max(cold):12,.0f} rows/s "
                  f"from the disk ({warm / (baseline * args.batch):.1f}x / {max(cold) / (baseline * args.batch):.1f}x "
                  "what the in-memory training consumes)")


if __name__ == "__main__":
    main()
