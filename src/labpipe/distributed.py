"""Data parallelism: which rank this process is, how the ranks start, and the few things they do together.

labpipe trains on several devices with PyTorch's own machinery: DistributedDataParallel (DDP) over a
torch.distributed process group, NCCL on CUDA and gloo on the CPU. The ranks come from a launcher:
  torchrun        `torchrun --nproc-per-node N -m labpipe lm-train`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
  Slurm           one task per rank (`labpipe jobs submit --nodes/--gpus-per-node`, or `srun labpipe ...`):
                  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's first node as the master (submitit's
                  TorchDistributedEnvironment reads them)
  labpipe itself  `<section>.devices` > 1 (0: one rank per visible GPU) starts the verb again under torch's
                  elastic launcher, the engine of torchrun, on this host: launch()
Every rank computes; rank 0 alone takes the output lock, writes checkpoints and outputs and logs to MLflow
(labpipe.run). Collectives time out (`collective_timeout_s`), so a rank that dies fails the others instead of
hanging them; torchrun's agent stops the survivors at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from labpipe.errors import UserError

T = TypeVar("T")


class RankLost(UserError):
    """A collective failed: another rank died or stopped answering. The checkpoints written so far stay."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank's index on its host: its GPU

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def _slurm_ranks() -> bool:
    """A Slurm step of several tasks (srun), each of them a rank."""
    env = os.environ
    return "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1


def world() -> World:
    """This process's rank, from torchrun's variables or else Slurm's (then exported as torchrun's, for the
    env:// rendezvous: the job's first node is the master, the port a function of the job id); a single rank
    without either."""
    env = os.environ
    if "RANK" not in env and _slurm_ranks():
        from submitit.slurm.slurm import SlurmJobEnvironment  # parses Slurm's node lists

        job = SlurmJobEnvironment()
        env.setdefault("MASTER_ADDR", job.hostnames[0])
        env.setdefault("MASTER_PORT", str(20000 + int(job.job_id.split("_")[0]) % 40000))
        env.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    return SINGLE


def launched() -> bool:
    """Is this process one rank of several started by a launcher?"""
    return ("RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1) or _slurm_ranks()


def ranks_to_start(devices: int, device: torch.device) -> int:
    """How many ranks `<section>.devices` asks this host for: N, or with 0 one per visible GPU (1 without)."""
    if devices:
        return devices
    return torch.cuda.device_count() if device.type == "cuda" else 1


def rank_device(world: World, device: torch.device) -> torch.device:
    """The rank's device: its local GPU on CUDA (cuda:LOCAL_RANK, or cuda:0 where the launcher made one GPU
    visible per task); `device` elsewhere."""
    if device.type != "cuda" or world.size == 1:
        return device
    return torch.device("cuda", world.local_rank % torch.cuda.device_count())


# ----------------------------------------------------------------------------- starting the ranks


def launch(argv: list[str], ranks: int, what: str) -> int:
    """Run `python -m labpipe ARGV` as `ranks` ranks on this host under torch's elastic launcher (torchrun's
    engine: a c10d rendezvous on a free local port, no restarts) and return the exit code: 0, or the first
    failed rank's. The ranks print their own errors; this adds one line naming the rank that failed first."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"labpipe-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.5)
    print(f"{what}: starting {ranks} ranks (torch.distributed elastic launch, as torchrun)", flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", "labpipe", *argv)
    except ChildFailedError as error:
        rank, failure = min(error.failures.items(), key=lambda item: item[1].timestamp)
        code = failure.exitcode
        said = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"{what}: rank {rank} failed first ({said}); the other ranks were stopped", file=sys.stderr)
        return code if code > 0 else 128 - code
    except SignalException as stop:  # SIGTERM or Ctrl-C: the launcher has stopped the ranks
        print(f"{what}: stopped by {signal.Signals(stop.sigval).name}: outputs left as they were", file=sys.stderr)
        return 128 + stop.sigval
    return 0


# What gloo says when a peer's socket closes: DDP's backward raises it as a plain RuntimeError.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "gloo/transport")


@contextlib.contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[None]:
    """The process group of `world` for the duration of the block (nothing for a single rank); a failed
    collective inside it becomes RankLost (one line, exit 1) rather than a traceback."""
    if world.size == 1:
        yield
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield
    except RuntimeError as error:
        if not isinstance(error, dist.DistError) and not any(sign in str(error) for sign in PEER_LOST):
            raise  # a bug, not another rank's failure
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise RankLost(f"rank {world.rank} of {world.size}: a collective failed, another rank stopped or stopped "
                       f"answering ({first}); rerun to resume from the newest checkpoint") from None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- what the ranks do together


def share(rows: int, world: World) -> slice:
    """Rank's contiguous share of `rows` rows: the shares of all ranks are disjoint, cover every row, in order,
    and differ in size by at most one."""
    return slice(world.rank * rows // world.size, (world.rank + 1) * rows // world.size)


def all_sum(values: list[float], world: World) -> list[float]:
    """The sums over the ranks of each value (float64)."""
    if world.size == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(world: World, compute: Callable[[], T]) -> T:
    """Rank 0's `compute()`, given to every rank; the others do not compute it. Rank 0's exception is raised
    on every rank, so a refusal (a held lock, a bad checkpoint) stops all of them with the same line."""
    if world.size == 1:
        return compute()
    import torch.distributed as dist

    box: list[Any] = [None]
    if world.main:
        try:
            box[0] = ("value", compute())
        except Exception as error:  # noqa: BLE001 - handed to every rank, raised below
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def agree(world: World, value: Any, what: str) -> None:
    """UserError on every rank unless all ranks hold the same `value`."""
    if world.size == 1:
        return
    import torch.distributed as dist

    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    differ = [rank for rank, other in enumerate(values) if other != values[0]]
    if differ:
        raise UserError(f"rank(s) {', '.join(map(str, differ))} have another {what} than rank 0: every rank must "
                        "run the same code, params and data (a shared checkout)")


def data_parallel(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DDP (gradients averaged over the ranks in backward), or itself for a single rank."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
