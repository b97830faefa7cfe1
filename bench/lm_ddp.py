"""Tokens/s of lm_train's data-parallel step: one process vs N ranks (DDP) on the same step batch.

    python bench/lm_ddp.py [--quick] [--ranks 2] [--steps 20] [--device cpu|cuda] [--compile]
                           [--set lm.hidden_size=768 ...]

The step is the stage's own: each rank its share of the step batch (distributed.share), accumulate_gradients
through DDP (gloo on the CPU, NCCL on CUDA), clip, AdamW, on params.yaml's lm model and step batch (random
tokens of synth.seq_length; --set changes either). Each configuration runs in fresh processes started from
this one (torch.multiprocessing), timed after warm-up steps, and the figures are printed together: tokens/s,
the speed-up over one process and the scaling efficiency (speed-up / N). On a CPU the ranks share its cores
(torch threads = cores / N each), so expect little speed-up there: the figure is what DDP's synchronization
costs. On a GPU host each rank has a GPU of its own. --compile wraps the model in torch.compile as lm.compile
does (the warm-up steps then include the compilation). bench/gpu.py calls measure() for one process.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe import distributed  # noqa: E402
from labpipe.config import load_params  # noqa: E402
from labpipe.lm.train import accumulate_gradients, build_model, parameter_groups  # noqa: E402

VOCAB = 100  # the default HMM's vocabulary (hmm.vocab_size)
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, ranks: int, port: int, device_name: str, sets: list[str], steps: int, results,
              compiled: bool = False) -> None:
    """One rank: the stage's step `steps` times after 3 warm-up steps; rank 0 puts its figures in `results`:
    tokens/s, the warm-up's seconds (torch.compile's compilation with `compiled`) and the CUDA peak memory."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                      LOCAL_RANK=str(rank))
    params = load_params(PARAMS, sets)
    lm, seq_length = params.lm, params.synth.seq_length
    world = distributed.world()
    device = distributed.rank_device(world, torch.device(device_name))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    with distributed.process_group(world, device, timeout_s=600):
        torch.manual_seed(0)
        model = build_model(lm, VOCAB).to(device).train()
        optimizer = torch.optim.AdamW(parameter_groups(model, lm.weight_decay), lr=lm.lr,
                                      betas=(lm.adam_beta1, lm.adam_beta2), fused=device.type == "cuda")
        parallel = distributed.data_parallel(model, world, device)
        step_model = torch.compile(parallel) if compiled else parallel  # as train_model does with lm.compile
        step_rows = lm.batch_size * lm.grad_accum_steps
        rows = torch.randint(0, VOCAB, (step_rows, seq_length))[distributed.share(step_rows, world)].to(device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(step_model, rows, lm.batch_size, step_rows, world.size, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), lm.grad_clip)
            optimizer.step()

        warmup_started = time.perf_counter()
        for _ in range(3):  # warm-up: allocator, kernels, DDP's buckets
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_s = time.perf_counter() - warmup_started
        distributed.all_sum([0.0], world)  # every rank starts the clock together
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if world.main:
            results.put({"tokens_per_s": step_rows * seq_length * steps / elapsed, "warmup_s": warmup_s,
                         "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                         else None})


def measure(ranks: int, device: str, sets: list[str], steps: int, compiled: bool = False,
            spawn: bool = True) -> dict:
    """rank_main's figures for `ranks` fresh processes (spawned) on `device`; spawn=False runs one rank in this
    process (no interpreter to start; its environment variables restored after)."""
    if not spawn:
        if ranks != 1:
            raise ValueError("spawn=False runs a single rank")
        results, saved = queue.SimpleQueue(), dict(os.environ)
        try:
            rank_main(0, 1, free_port(), device, sets, steps, results, compiled)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return results.get()
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(rank_main, args=(ranks, free_port(), device, sets, steps, results, compiled), nprocs=ranks,
                       start_method="spawn")
    return results.get()


def tokens_per_second(ranks: int, device: str, sets: list[str], steps: int, compiled: bool = False) -> float:
    return measure(ranks, device, sets, steps, compiled)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts to compare with one process")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per configuration")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--quick", action="store_true", help="5 steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (lm.compile)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 5

    params = load_params(PARAMS, args.set)
    lm = params.lm
    size = sum(p.numel() for p in build_model(lm, VOCAB).parameters())
    step_rows = lm.batch_size * lm.grad_accum_steps
    print(f"step batch {step_rows} rows x {params.synth.seq_length} tokens; Llama d={lm.hidden_size} x {lm.layers} "
          f"layers ({size:,} parameters); {args.device}, {os.cpu_count()} cores; {args.steps} steps each")
    single = tokens_per_second(1, args.device, args.set, args.steps, args.compile)
    print(f"1 process:  {single:12,.0f} tokens/s")
    for ranks in args.ranks:
        rate = tokens_per_second(ranks, args.device, args.set, args.steps, args.compile)
        print(f"{ranks} ranks:    {rate:12,.0f} tokens/s   speed-up {rate / single:5.2f}x   "
              f"scaling efficiency {rate / single / ranks:5.0%}")


if __name__ == "__main__":
    main()
