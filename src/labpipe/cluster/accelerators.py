"""labpipe accelerators [--cluster [--nodes N --gpus-per-node G]]: the GPUs here, per node of the Slurm cluster,
and which nodes a job of N nodes with G GPUs each (`labpipe jobs submit --nodes N --gpus-per-node G`) could get.

Here: nvidia-smi when it is installed (every GPU the driver sees, with memory in use and utilization),
else torch.cuda (the GPUs this process may use). On the cluster: `scontrol show node`, whose Gres field
(`gpu:a100:4(S:0-1)`) says what each node has and whose AllocTRES (`gres/gpu=2`) says how many are taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys

from labpipe.cluster import slurm


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_gib: float
    used_gib: float
    utilization: str  # "35%", or "" where unknown (torch does not say)


def local_gpus() -> tuple[list[Gpu], str]:
    """The GPUs this machine shows, and a one-line summary (why there are none, when there are none)."""
    import torch  # here, not at the top: `labpipe jobs` imports this module and rarely needs torch

    gpus = _nvidia_smi() if shutil.which("nvidia-smi") else []
    if not gpus and torch.cuda.is_available():
        gpus = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(Gpu(index, torch.cuda.get_device_name(index), total / 2**30, (total - free) / 2**30, ""))
    if gpus:
        return gpus, f"{len(gpus)} CUDA GPU(s) (torch {torch.__version__}, CUDA {torch.version.cuda})"
    if torch.version.cuda is None:
        return [], f"no CUDA GPU visible (torch {torch.__version__} CPU build)"
    return [], (f"no CUDA GPU visible (torch {torch.__version__}, CUDA {torch.version.cuda}: check the driver "
                "and CUDA_VISIBLE_DEVICES)")


def _nvidia_smi() -> list[Gpu]:
    query = "index,name,memory.total,memory.used,utilization.gpu"
    done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:  # installed, but no driver or no device: torch gets its say
        return []
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu --format=csv,noheader,nounits`
    (memory in MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        index, name, total, used, utilization = (field.strip() for field in line.split(","))
        gpus.append(Gpu(int(index), name, float(total) / 1024, float(used) / 1024,
                        f"{utilization}%" if utilization.isdigit() else ""))
    return gpus


def format_nodes(nodes: list[slurm.Node]) -> list[str]:
    """One line per node: name, partitions, state, CPUs in use, and its GPUs by type with how many are taken."""
    rows = [("node", "partitions", "state", "cpus used", "gpus (used/total)")]
    for node in nodes:
        gpus = [g for g in node.gres if g.name == "gpu"]
        described = ", ".join(f"{g.count}x {g.type or 'gpu'}" for g in gpus)
        rows.append((node.name, ",".join(node.partitions), node.state.lower(), f"{node.cpus_allocated}/{node.cpus}",
                     f"{node.gpus_allocated}/{node.gpus} ({described})" if gpus else "none"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe accelerators", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", action="store_true", help="also the GPUs of every node of the Slurm cluster")
    parser.add_argument("--nodes", type=int, help="with --cluster: which nodes a job of this many nodes could get")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--tasks-per-node", type=int, help="default: one per GPU (one rank each)")
    parser.add_argument("--partition", help="default: the cluster's default partition")
    args = parser.parse_args(argv)
    if args.nodes is not None and not args.cluster:
        parser.error("--nodes needs --cluster")

    gpus, summary = local_gpus()
    print(f"here: {summary}")
    for gpu in gpus:
        use = f"{gpu.used_gib:.1f} GiB used" + (f", {gpu.utilization} busy" if gpu.utilization else "")
        print(f"  cuda:{gpu.index}  {gpu.name}  {gpu.memory_gib:.1f} GiB  ({use})")
    if not args.cluster:
        return 0
    try:
        nodes = slurm.nodes()
        name = slurm.version()
    except slurm.SlurmError as error:
        print(f"labpipe accelerators: error: {error}", file=sys.stderr)
        return 1
    total = sum(node.gpus for node in nodes)
    print(f"cluster ({name}): {len(nodes)} node(s), {total} GPU(s)")
    for line in format_nodes(nodes):
        print(f"  {line}")
    return 0 if args.nodes is None else print_request(args, nodes)


def print_request(args: argparse.Namespace, nodes: list[slurm.Node]) -> int:
    """Which nodes a job of args.nodes nodes could run on; 1 when the partition has too few."""
    partition = args.partition or slurm.partitions()[1]
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    fit = slurm.fitting(nodes, partition, args.gpus_per_node, tasks)
    free = [n for n in fit if n.gpus - n.gpus_allocated >= args.gpus_per_node and n.cpus - n.cpus_allocated >= tasks
            and not any(state in n.state for state in ("DOWN", "DRAIN", "FAIL"))]
    ranks = args.nodes * tasks
    print(f"a job of {args.nodes} node(s) x {args.gpus_per_node} GPU(s), {tasks} task(s) each ({ranks} ranks) in "
          f"partition {partition}: {len(fit)} node(s) fit ({', '.join(n.name for n in fit) or 'none'}), "
          f"{len(free)} of them free now")
    if len(fit) < args.nodes:
        print(f"  refused: labpipe jobs submit would not send it (the partition has {len(fit)} such node(s))")
        return 1
    print("  it would " + ("start now" if len(free) >= args.nodes else "wait in the queue for nodes to free up"))
    return 0
