"""labpipe jobs: run a stage as a job, on this machine (DVC's queue) or on Slurm (submitit), and follow it.

    labpipe jobs submit grok_train --set grok.epochs=100          # DVC's experiment queue, here
    labpipe jobs submit grok_train --executor slurm --partition gpu --gpus 1 --time 4:00:00 \\
        --sweep grok.weight_decay=0.01,0.03,0.1                    # one Slurm array task per value
    labpipe jobs submit hmm_train --zip hmm.hidden_states=100,200,300 --zip hmm.batch_size=1024,256,256
                                                # paired lists: (100, 1024), (200, 256), (300, 256)
    labpipe jobs submit lm_train --executor slurm --nodes 2 --gpus-per-node 4   # 8 ranks, one per GPU
    labpipe jobs list
    labpipe jobs show <id>                      # state, last MLflow metrics, log tail (a prefix of the id will do)
    labpipe jobs follow <id>                    # its log and MLflow metrics as they come, until it ends
    labpipe jobs modify <id> --time 2:00:00     # Slurm: pending jobs only (scontrol update)
    labpipe jobs modify <id> --set grok.lr=0.003  # local: queued tasks only (removed and queued again)
    labpipe jobs release <id>                   # start a job submitted with --hold
    labpipe jobs cancel <id>

A job records its code (commit), config (resolved params) and data (dvc.lock) in .labpipe/jobs/<id>.json.
Bad input (an unknown stage or params key, a partition Slurm does not know, GPUs or nodes that are not there,
a dirty tree) is refused with exit code 2 before anything is submitted. A data-parallel stage (lm_train) on
Slurm runs one rank per task: --tasks-per-node of them on each of --nodes nodes (default: one per GPU).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from labpipe import environment
from labpipe import registry as lines
from labpipe.cluster import capture, local, registry, slurm
from labpipe.cluster.registry import JobRecord, Task
from labpipe.config import ConfigError

DEFAULT_TIME = "1:00:00"  # submitit's own default is 5 minutes


class JobError(ValueError):
    """Bad input: refused with exit code 2, before anything is submitted or changed."""


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    project = Path.cwd()
    try:
        return args.command(args, project)
    except (JobError, ConfigError, capture.CaptureError, registry.UnknownJob) as error:
        print(f"labpipe jobs {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except (slurm.SlurmError, local.QueueError) as error:  # the scheduler refused, or is not there
        print(f"labpipe jobs {args.verb}: error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labpipe jobs", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="verb")

    p = verbs.add_parser("submit", help="run a stage as a job (a sweep: one task per value)")
    p.add_argument("stage", help="a stage of dvc.yaml (grok_train; grok-train works too)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one param")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one task per value (several --sweep: their product)")
    p.add_argument("--zip", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="paired lists of equal length: task i takes the i-th value of every --zip (crossed with "
                        "any --sweep)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: DVC's experiment queue on this machine; slurm: sbatch through submitit")
    p.add_argument("--gpus", "--gpus-per-node", dest="gpus", type=int, default=0,
                   help="GPUs per node (local: checked to be here)")
    p.add_argument("--nodes", type=int, default=1, help="Slurm nodes (data-parallel stages: lm_train)")
    p.add_argument("--tasks-per-node", type=int,
                   help="Slurm tasks per node, one rank each (default: one per GPU for lm_train, else 1)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", help=f"Slurm time limit ({slurm.TIME_FORMATS}; default {DEFAULT_TIME}); at the "
                                  "limit the job checkpoints and is requeued (3 times at most)")
    p.add_argument("--hold", action="store_true", help="submit but do not start: `labpipe jobs release` starts it "
                                                        "(local: refused while a DVC queue worker runs)")
    p.add_argument("--jobs", type=int, default=1, help="local: tasks run at once (DVC queue workers; default 1)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run the working tree as it is (its tracked changes), not only committed code")
    p.set_defaults(command=submit)

    verbs.add_parser("list", help="every job of this project and its state").set_defaults(command=list_jobs)

    p = verbs.add_parser("show", help="one job: what it runs, state, last MLflow metrics, log tail")
    p.add_argument("job")
    p.add_argument("--lines", type=int, default=10, help="log lines per task (default 10)")
    p.set_defaults(command=show)

    p = verbs.add_parser("follow", help="stream a job's log and MLflow metrics until every task has ended")
    p.add_argument("job")
    p.add_argument("--interval", type=float, default=5, help="seconds between looks (default 5)")
    p.set_defaults(command=follow)

    p = verbs.add_parser("modify", help="Slurm: --time/--partition of a pending job; local: --set of a queued one")
    p.add_argument("job")
    p.add_argument("--time")
    p.add_argument("--partition")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(command=modify)

    p = verbs.add_parser("release", help="start a job submitted with --hold")
    p.add_argument("job")
    p.set_defaults(command=release)

    p = verbs.add_parser("cancel", help="cancel a job (every task that has not finished)")
    p.add_argument("job")
    p.set_defaults(command=cancel)
    return parser


# ----------------------------------------------------------------------------- submit


def submit(args: argparse.Namespace, project: Path) -> int:
    stage = _stage(project, args.stage)
    _check_ranks(args, stage)
    tasks = capture.resolve_tasks(project / "params.yaml", args.set, args.sweep, args.zip)
    for _overrides, params in tasks:
        capture.check_shards_reachable(project, stage, params)
    if args.executor == "local":
        _check_local(args, project)
    else:
        args.time = args.time or DEFAULT_TIME
        args.partition = _check_slurm(args)
    code = capture.capture_code(project, args.allow_dirty)

    job_id = registry.new_id(stage)
    record = JobRecord(
        id=job_id, stage=stage, executor=args.executor, submitted=registry.now(), project=str(project),
        code=code, data=capture.capture_data(project), tracking_uri=_tracking_uri(project),
        environment=environment.environment(),
        resources={"partition": args.partition, "gpus": args.gpus, "nodes": args.nodes,
                   "tasks_per_node": args.tasks_per_node, "time": args.time, "hold": args.hold,
                   "jobs": args.jobs},
        tasks=[Task(i, overrides, params, name=f"{job_id}-{i}" if args.executor == "local" else "")
               for i, (overrides, params) in enumerate(tasks)],
    )
    if args.executor == "local":
        _submit_local(record)
    else:
        _submit_slurm(record)
    registry.save(record)

    where = f"Slurm job {record.slurm_job_id}" if record.executor == "slurm" else "DVC's experiment queue"
    ranks = args.nodes * args.tasks_per_node
    print(f"submitted {record.id}: {stage}, {len(record.tasks)} task(s), to {where}"
          + (f", each {ranks} ranks ({args.nodes} node(s) x {args.tasks_per_node})" if ranks > 1 else "")
          + (" (held: labpipe jobs release starts it)" if args.hold else ""))
    print(f"  code {code['commit'][:12]}" + (f" + uncommitted changes (as {code['snapshot'][:12]})"
                                            if code["dirty"] else "")
          + f", data dvc.lock sha256 {record.data['dvc_lock_sha256'][:12]}")
    return 0


def _stage(project: Path, name: str) -> str:
    """The dvc.yaml stage `name` (or its verb spelling, grok-train), or a JobError listing them."""
    known = capture.stages(project)
    for candidate in (name, name.replace("-", "_")):
        if candidate in known:
            return candidate
    raise JobError(f"unknown stage {name!r}: the stages of dvc.yaml are {', '.join(known)}")


def _check_ranks(args: argparse.Namespace, stage: str) -> None:
    """Resolve args.tasks_per_node: several tasks or nodes only for a data-parallel stage on Slurm."""
    training = lines.STAGES[stage].training if stage in lines.STAGES else None
    parallel = training is not None and training.data_parallel
    for flag, value in (("--nodes", args.nodes), ("--tasks-per-node", args.tasks_per_node), ("--gpus", args.gpus)):
        if value is not None and value < (0 if flag == "--gpus" else 1):
            raise JobError(f"{flag} {value}: give at least {0 if flag == '--gpus' else 1}")
    several = args.nodes > 1 or (args.tasks_per_node or 1) > 1
    if several and not parallel:
        raise JobError(f"--nodes/--tasks-per-node: {stage} trains in one process; several ranks are for "
                       f"{', '.join(s.name for s in lines.STAGES.values() if s.training and s.training.data_parallel)}")
    if several and args.executor == "local":
        raise JobError("--nodes and --tasks-per-node are Slurm's: on this machine the ranks are "
                       f"{training.section}.devices (--set {training.section}.devices=N)")
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.gpus, 1) if parallel and args.executor == "slurm" else 1


def _check_local(args: argparse.Namespace, project: Path) -> None:
    if args.partition or args.time:
        raise JobError("--partition and --time are Slurm's: add --executor slurm (the local queue runs here)")
    if args.jobs < 1:
        raise JobError(f"--jobs {args.jobs}: give at least 1")
    # DVC's queue has no hold: a job is held by queueing it without starting a worker, which only holds
    # while no worker runs.
    if args.hold and (workers := local.status(project).workers):
        raise JobError(f"--hold: {workers} DVC queue worker(s) running here would start the job at once; "
                       "wait until they finish (dvc queue status), or submit without --hold")
    if args.gpus:
        from labpipe.cluster.accelerators import local_gpus

        gpus, summary = local_gpus()
        if len(gpus) < args.gpus:
            raise JobError(f"--gpus {args.gpus} with the local executor, but here: {summary}; "
                           "submit with --executor slurm, or without --gpus")


def _check_slurm(args: argparse.Namespace) -> str:
    """The partition the job goes to, after checking it and the GPUs asked for against the cluster."""
    _minutes(args.time)
    try:
        known, default = slurm.partitions()
    except slurm.SlurmError as error:
        raise JobError(f"--executor slurm: {error}") from error
    partition = args.partition or default
    if partition is None:
        raise JobError(f"the cluster has no default partition: pass --partition (one of {', '.join(known)})")
    if partition not in known:
        raise JobError(f"partition {partition!r} is not one Slurm knows: {', '.join(known)}")
    nodes = slurm.nodes()
    if args.gpus:
        most = max((node.gpus for node in nodes if partition in node.partitions), default=0)
        if most < args.gpus:
            raise JobError(f"--gpus {args.gpus}: no node of partition {partition!r} has that many GPUs (the most "
                           f"is {most}; labpipe accelerators --cluster lists them)")
    fit = slurm.fitting(nodes, partition, args.gpus, args.tasks_per_node)
    if len(fit) < args.nodes:
        raise JobError(f"--nodes {args.nodes} with {args.tasks_per_node} task(s) and {args.gpus} GPU(s) each: "
                       f"partition {partition!r} has {len(fit)} such node(s) (labpipe accelerators --cluster "
                       f"--nodes {args.nodes} --gpus-per-node {args.gpus} shows them)")
    return partition


def _minutes(time: str) -> int:
    try:
        return slurm.parse_time(time)
    except ValueError as error:
        raise JobError(str(error)) from error


def _tracking_uri(project: Path) -> str:
    """Where the job's MLflow runs go: MLFLOW_TRACKING_URI, else the project's mlflow.db (as labpipe.tracking
    decides), as an absolute path: jobs run in other directories (DVC's temp copies, Slurm snapshots)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not os.path.isabs(uri.removeprefix("sqlite:///")):
        uri = f"sqlite:///{(project / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def _submit_local(record: JobRecord) -> None:
    project = Path(record.project)
    for task in record.tasks:
        local.queue(project, task.name, record.stage, task.overrides)
    _create_store(record.tracking_uri)  # --jobs N workers would race to create it
    if not record.resources["hold"]:
        local.start(project, record.tracking_uri, record.resources["jobs"])


def _submit_slurm(record: JobRecord) -> None:
    import submitit

    from labpipe.cluster.runner import StageJob

    project = Path(record.project)
    commit = record.code["snapshot"]
    capture.keep_commit(project, commit, record.id)
    cache_dir = capture.dvc_cache_dir(project, str(Path(sys.executable).parent / "dvc"))
    for task in record.tasks:
        workdir = record.folder / f"task-{task.index}"
        capture.make_snapshot(project, commit, workdir, task.params, cache_dir)
        task.workdir = str(workdir)
    _create_store(record.tracking_uri)

    resources = record.resources
    executor = submitit.AutoExecutor(folder=record.folder / "logs", cluster="slurm")
    executor.update_parameters(
        name=record.id,
        timeout_min=_minutes(resources["time"]),
        slurm_partition=resources["partition"],
        **({"gpus_per_node": resources["gpus"]} if resources["gpus"] else {}),
        nodes=resources.get("nodes", 1),
        tasks_per_node=resources.get("tasks_per_node", 1),  # one rank each (runner.StageJob)
        **({"slurm_additional_parameters": {"hold": True}} if resources["hold"] else {}),
    )
    # One callable per task; several make one array job (arrays of 1 are plain jobs).
    submitted = executor.submit_array([
        StageJob(record.id, task.index, record.stage, task.workdir, record.tracking_uri,
                 record.data["dvc_lock_sha256"])
        for task in record.tasks
    ])
    record.slurm_job_id = submitted[0].job_id.split("_")[0]


def _mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as labpipe.tracking: no calls home
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _create_store(uri: str) -> None:
    """A new SQLite store gets its tables on first use; tasks starting together (a Slurm array, local
    workers) would race to create them, so the submission creates them first."""
    if uri.startswith("sqlite:///"):
        _mlflow_client(uri).search_experiments(max_results=1)


# ----------------------------------------------------------------------------- state


def task_states(record: JobRecord, queue: local.Queue | None = None) -> list[str]:
    """The state of each task, from the scheduler: `dvc queue status`, or squeue and submitit's result files."""
    if record.executor == "local":
        queue = local.status(Path(record.project)) if queue is None else queue
        states = [queue.tasks.get(task.name, "not in the queue").upper() for task in record.tasks]
        return ["CANCELLED" if record.cancelled and state != "SUCCESS" else state for state in states]

    known = {state.task: state for state in slurm.job_states(record.slurm_job_id)}
    states = []
    for task in record.tasks:
        state = known.get(task.index if len(record.tasks) > 1 else None)
        if state is not None:
            states.append(f"{state.state} ({state.reason})" if state.state == "PENDING" else state.state)
            continue
        # Gone from squeue (finished over MinJobAge ago; no accounting to ask): submitit's result file says.
        job = _submitit_job(record, task)
        if job.paths.result_pickle.exists():
            states.append("COMPLETED" if job.exception() is None else "FAILED")
        else:
            states.append("CANCELLED" if record.cancelled else "ENDED WITHOUT RESULT (see its log)")
    return states


def _submitit_job(record: JobRecord, task: Task):
    """submitit's handle on a submitted task (its log and result files), reattached by folder and job id."""
    import submitit

    job_id = f"{record.slurm_job_id}_{task.index}" if len(record.tasks) > 1 else record.slurm_job_id
    return submitit.SlurmJob(folder=record.folder / "logs", job_id=job_id)


def _summary(states: list[str]) -> str:
    counts = collections.Counter(state.split(" (")[0] for state in states)
    return ", ".join(f"{state} x{n}" if n > 1 else state for state, n in counts.items())


# ----------------------------------------------------------------------------- list, show


def list_jobs(args: argparse.Namespace, project: Path) -> int:
    records = registry.load_all(project)
    if not records:
        print("no jobs yet (labpipe jobs submit <stage>)")
        return 0
    queue = None
    rows = [("job", "executor", "tasks", "state", "submitted")]
    for record in records:
        try:
            if record.executor == "local" and queue is None:
                queue = local.status(project)  # one call for every local job
            state = _summary(task_states(record, queue))
        except (slurm.SlurmError, local.QueueError) as error:
            state = f"unknown ({error})"
        executor = f"slurm {record.slurm_job_id}" if record.executor == "slurm" else "local"
        rows.append((record.id, executor, str(len(record.tasks)), state, record.submitted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def show(args: argparse.Namespace, project: Path) -> int:
    record = registry.find(project, args.job)
    try:
        states = task_states(record)
    except (slurm.SlurmError, local.QueueError) as error:  # the record still says what was submitted
        states = [f"unknown ({error})"] * len(record.tasks)
    code = record.code
    print(f"job {record.id}")
    print(f"  stage      {record.stage}")
    asked = record.resources
    print("  executor   " + (f"slurm, job {record.slurm_job_id}, partition {asked['partition']}, "
                              f"time {asked['time']}, {asked.get('nodes', 1)} node(s) x "
                              f"{asked.get('tasks_per_node', 1)} task(s), gpus {asked['gpus']} per node"
                              if record.executor == "slurm" else
                              f"local (DVC's experiment queue, {asked.get('jobs', 1)} at once)"))
    print(f"  submitted  {record.submitted}")
    print(f"  code       {code['commit']}" + (f" + uncommitted changes, run as {code['snapshot']}"
                                                if code["dirty"] else ""))
    print(f"  data       dvc.lock sha256 {record.data['dvc_lock_sha256']}")
    if record.environment:
        env = record.environment
        print(f"  env        Python {env['python']}, torch {env['torch'] or '-'}, {len(env['packages'])} packages "
              f"(sha256 {env['packages_sha256'][:12]})")
    print(f"  mlflow     {record.tracking_uri}")
    if record.executor == "slurm":
        print(f"  folder     {record.folder}")
    for entry in record.history:
        details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("at", "action"))
        print(f"  {entry['action']:<10} {entry['at']}" + (f": {details}" if details else ""))

    runs = _mlflow_runs(record)
    for task, state in zip(record.tasks, states, strict=True):
        label = " ".join(task.overrides) or "params.yaml as committed"
        print(f"\ntask {task.index} ({label}): {state}" + (f"  [dvc exp {task.name}]" if task.name else ""))
        for line in runs.get(task.index, []):
            print(f"  {line}")
        for line in _log_tail(record, task, args.lines):
            print(f"  | {line}")
    return 0


def _mlflow_runs(record: JobRecord) -> dict[int, list[str]]:
    """Each task's MLflow runs and their last metrics. Slurm tasks tag their runs labpipe.job_id and
    labpipe.task (runner.py); queued DVC experiments tag theirs dvc.exp_name (labpipe.tracking)."""
    try:
        client = _mlflow_client(record.tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if record.executor == "slurm":
            found = client.search_runs(experiments, f"tags.`labpipe.job_id` = '{record.id}'")
            task_of = {run.info.run_id: int(run.data.tags.get("labpipe.task", 0)) for run in found}
        else:
            found = client.search_runs(experiments, f"tags.`dvc.exp_name` LIKE '{record.id}-%'")
            index = {task.name: task.index for task in record.tasks}
            task_of = {run.info.run_id: index.get(run.data.tags["dvc.exp_name"], -1) for run in found}
    except Exception as error:  # a store that is not there (yet), a server that does not answer
        return {task.index: [f"mlflow: no runs ({type(error).__name__}: {error})"] for task in record.tasks}
    runs: dict[int, list[str]] = collections.defaultdict(list)
    for run in sorted(found, key=lambda r: r.info.start_time):
        line = f"mlflow run {run.info.run_id[:12]} {run.data.tags.get('labpipe.stage', '')} {run.info.status}"
        # The headline metrics; the per-layer and per-group ones (a `/` in their name) are only counted.
        headline = {k: v for k, v in sorted(run.data.metrics.items()) if "/" not in k}
        if headline:
            step = max(m.step for m in client.get_metric_history(run.info.run_id, next(iter(headline))))
            more = len(run.data.metrics) - len(headline)
            line += f", step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in headline.items()) \
                + (f" (+{more} more)" if more else "")
        runs[task_of[run.info.run_id]].append(line)
        if other := _other_environment(record, run.data.tags):
            runs[task_of[run.info.run_id]].append(f"  ran under another environment than submitted: {other}")
    return runs


def _other_environment(record: JobRecord, tags: Mapping[str, str]) -> str:
    """What of the run's environment (its labpipe.env.* tags) differs from the submission's; '' if nothing."""
    submitted = record.environment
    return ", ".join(f"{key} {tags[f'labpipe.env.{key}']} (submitted {submitted[key]})"
                     for key in environment.ENVIRONMENT_TAGS
                     if submitted and tags.get(f"labpipe.env.{key}", submitted[key]) != submitted[key])


def _log_tail(record: JobRecord, task: Task, lines: int) -> list[str]:
    """The last lines of the task's log."""
    # tqdm redraws its bar with carriage returns: each redraw counts as a line, the last one is the latest.
    text = _log_text(record, task)
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:] if lines else []


def _log_text(record: JobRecord, task: Task) -> str:
    """The task's log so far: submitit's stdout and stderr files, or `dvc queue logs`."""
    if record.executor == "slurm":
        paths = _submitit_job(record, task).paths
        text = "".join(p.read_text(errors="replace") for p in (paths.stdout, paths.stderr) if p.exists())
    else:
        try:
            text = local.logs(Path(record.project), task.name)
        except local.QueueError:  # not started yet
            text = ""
    return text


# ----------------------------------------------------------------------------- follow

# task_states' words (Slurm's, DVC's queue's in capitals, and labpipe's own) for a task that will not run again
ENDED = ("COMPLETED", "SUCCESS", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "ENDED WITHOUT RESULT", "NOT IN THE QUEUE")
SUCCEEDED = ("COMPLETED", "SUCCESS")


def follow(args: argparse.Namespace, project: Path) -> int:
    """Print each task's new log lines (the newest redraw of a progress bar once) and its MLflow runs' metrics
    when they change, every --interval seconds, until every task has ended: 0 when all succeeded, else 1.
    Ctrl-C stops following, not the job."""
    record = registry.find(project, args.job)
    shown = {task.index: 0 for task in record.tasks}  # complete log lines printed
    last: dict[tuple[int, str], str] = {}  # (task, kind) -> the line printed last: the progress, each run
    try:
        while True:
            states = task_states(record)
            for task in record.tasks:
                complete, _, partial = _log_text(record, task).rpartition("\n")
                lines = [line.rsplit("\r", 1)[-1] for line in complete.split("\n")] if complete else []
                for line in lines[shown[task.index]:]:
                    if line.strip():
                        print(f"task {task.index} | {line}", flush=True)
                shown[task.index] = len(lines)
                _print_changed(last, task.index, "progress", partial.rsplit("\r", 1)[-1].strip())
            for index, runs in _mlflow_runs(record).items():
                for line in runs:
                    _print_changed(last, index, line.split(",")[0], line)
            if all(state.split(" (")[0] in ENDED for state in states):
                print(f"job {record.id} ended: {_summary(states)}")
                return 0 if all(state in SUCCEEDED for state in states) else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print(f"stopped following {record.id}; the job goes on (labpipe jobs show {record.id})")
        return 130


def _print_changed(last: dict[tuple[int, str], str], task: int, kind: str, line: str) -> None:
    if line and last.get((task, kind)) != line:
        print(f"task {task} | {line}" if kind == "progress" else f"task {task}: {line}", flush=True)
        last[(task, kind)] = line


# ----------------------------------------------------------------------------- modify, release, cancel


def modify(args: argparse.Namespace, project: Path) -> int:
    record = registry.find(project, args.job)
    if record.executor == "slurm":
        _modify_slurm(record, args)
    else:
        _modify_local(record, args)
    registry.save(record)
    return 0


def _modify_slurm(record: JobRecord, args: argparse.Namespace) -> None:
    if args.set:
        raise JobError("--set: a Slurm job's params are in its snapshot, fixed at submission; cancel the job "
                       "and submit it again with the new params")
    fields = {}
    if args.time:
        _minutes(args.time)
        fields["TimeLimit"] = args.time
    if args.partition:
        known, _ = slurm.partitions()
        if args.partition not in known:
            raise JobError(f"partition {args.partition!r} is not one Slurm knows: {', '.join(known)}")
        fields["Partition"] = args.partition
    if not fields:
        raise JobError("nothing to modify: give --time and/or --partition")
    states = [state.state for state in slurm.job_states(record.slurm_job_id)]
    if not states or any(state != "PENDING" for state in states):
        raise JobError(f"job {record.id} (Slurm job {record.slurm_job_id}) is "
                       f"{_summary(states) or 'no longer known to Slurm'}: Slurm changes the time limit and "
                       "partition of pending jobs only; cancel it and submit again")
    slurm.update_job(record.slurm_job_id, **fields)
    record.resources.update({"time": args.time or record.resources["time"],
                             "partition": args.partition or record.resources["partition"]})
    record.note("modify", **fields)
    print(f"{record.id}: Slurm job {record.slurm_job_id} updated: "
          + " ".join(f"{key}={value}" for key, value in fields.items()))


def _modify_local(record: JobRecord, args: argparse.Namespace) -> None:
    """New params for queued tasks: DVC cannot edit a queued experiment, so each is removed and queued again
    under the same name, from the same code (refused when the working tree has moved since submission)."""
    project = Path(record.project)
    if args.time or args.partition:
        raise JobError("--time and --partition are Slurm's; a local job's params change with --set")
    if not args.set:
        raise JobError("nothing to modify: give --set key=value")
    queue = local.status(project).tasks
    busy = [f"{task.name} is {queue.get(task.name, 'not in the queue')}" for task in record.tasks
            if queue.get(task.name) != "Queued"]
    if busy:
        raise JobError(f"only queued tasks can be modified ({'; '.join(busy)}): cancel the job and submit again")
    # The same code: compare trees, since `git stash create` makes a new commit of the same dirty tree each time.
    code = capture.capture_code(project, allow_dirty=record.code["dirty"])
    if capture.git(project, "rev-parse", f"{code['snapshot']}^{{tree}}") != \
            capture.git(project, "rev-parse", f"{record.code['snapshot']}^{{tree}}"):
        raise JobError("the working tree is no longer what the job was submitted from, and DVC queues the "
                       "working tree: submit a new job instead")
    changed_keys = {override.partition("=")[0] for override in args.set}
    resolved = []
    for task in record.tasks:
        overrides = [o for o in task.overrides if o.partition("=")[0] not in changed_keys] + args.set
        resolved += capture.resolve_tasks(project / "params.yaml", overrides, [])  # checked before any change
    for task, (overrides, params) in zip(record.tasks, resolved, strict=True):
        local.remove(project, task.name)
        local.queue(project, task.name, record.stage, overrides)
        task.overrides, task.params = overrides, params
    record.note("modify", set=" ".join(args.set))
    print(f"{record.id}: {len(record.tasks)} queued task(s) queued again with " + " ".join(args.set))


def release(args: argparse.Namespace, project: Path) -> int:
    record = registry.find(project, args.job)
    if record.executor == "slurm":
        slurm.release(record.slurm_job_id)
    else:
        local.start(project, record.tracking_uri, record.resources.get("jobs", 1))
    record.note("release")
    registry.save(record)
    print(f"{record.id}: released")
    return 0


def cancel(args: argparse.Namespace, project: Path) -> int:
    record = registry.find(project, args.job)
    states = task_states(record)
    if record.executor == "slurm":
        live = [state for state in states if state.split(" (")[0] in ("PENDING", "RUNNING", "REQUEUED",
                                                                        "CONFIGURING", "SUSPENDED")]
        if live:
            slurm.cancel(record.slurm_job_id)
    else:
        live = []
        for task, state in zip(record.tasks, states, strict=True):
            if state == "QUEUED":
                local.remove(project, task.name)
            elif state == "RUNNING":
                local.kill(project, task.name)
            else:
                continue
            live.append(state)
    if not live:
        print(f"{record.id}: nothing to cancel ({_summary(states)})")
        return 0
    record.cancelled = True
    record.note("cancel")
    registry.save(record)
    print(f"{record.id}: cancelled {len(live)} task(s)")
    return 0
