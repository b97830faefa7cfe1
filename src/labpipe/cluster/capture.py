"""What a job captures, so that what runs is what was submitted: the code, the config and the data.

- code: the git commit (a dirty tree is refused unless asked for; then the tree itself is captured as a
  commit object by `git stash create`, which touches neither the tree nor the stash list);
- config: the params of every task, resolved and checked like `labpipe <verb> --set` does;
- data: dvc.lock, which pins every stage output by hash (its sha256 and content go into the record).

A Slurm task runs in a snapshot: a clone of the project sharing its objects (`git clone --shared`), checked
out at that commit, with the task's resolved params.yaml written in, and the project's DVC cache as its
cache, so that `dvc checkout` restores the pinned data and `dvc repro` stores its outputs where the project
finds them.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from labpipe.config import ConfigError, Params, apply_override, build, parse_yaml


class CaptureError(ValueError):
    """The project is not in a state a job can be submitted from."""


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise CaptureError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def stages(project: Path) -> list[str]:
    """The stages of dvc.yaml, the names `dvc repro` and `dvc exp run` take."""
    path = project / "dvc.yaml"
    if not path.exists():
        raise CaptureError(f"no dvc.yaml in {project}: run labpipe jobs from the project's root")
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {}))


def check_shards_reachable(project: Path, stage: str, params: dict) -> None:
    """CaptureError when `stage` reads the synthetic shards (its deps hold their manifest) from a synth.out_dir
    inside the project: a job runs in a snapshot of the commit, which has the manifest (DVC's) but never the
    shards, which stay out of DVC."""
    from labpipe.synth.manifest import MANIFEST

    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
    out_dir = params["synth"]["out_dir"]
    if str(MANIFEST) in deps and not Path(out_dir).is_absolute():
        raise CaptureError(f"{stage} reads the synthetic shards in synth.out_dir={out_dir}, inside the project: a "
                           "job runs in a snapshot of the commit, which has their manifest (DVC) but not the shards; "
                           "set synth.out_dir to an absolute path that the job's machines share (as at full scale) "
                           "and run `dvc repro synth`, or train here without a job")


def capture_code(project: Path, allow_dirty: bool) -> dict[str, Any]:
    """HEAD, whether tracked files differ from it, and the commit that will run."""
    try:
        commit = git(project, "rev-parse", "HEAD")
    except CaptureError as error:
        raise CaptureError(f"{project} has no git commit to run: {error}") from error
    changed = git(project, "status", "--porcelain", "--untracked-files=no")
    if changed and not allow_dirty:
        files = ", ".join(line.split(None, 1)[1] for line in changed.splitlines()[:5])
        raise CaptureError(f"uncommitted changes in tracked files ({files}): commit them so that the job runs a "
                           "commit, or pass --allow-dirty to run the working tree as it is now")
    snapshot = git(project, "stash", "create") if changed else commit
    return {"commit": commit, "dirty": bool(changed), "snapshot": snapshot}


def resolve_tasks(params_path: Path, sets: list[str], sweeps: list[str], zips: Sequence[str] = ()) \
        -> list[tuple[list[str], dict]]:
    """(overrides, resolved params) per task: one task, or one per point of the sweep.

    `--sweep grok.weight_decay=0.01,0.03,0.1` gives three tasks; two --sweep flags give their product (the
    grid). `--zip` lists pair up instead: `--zip hmm.hidden_states=100,200 --zip hmm.batch_size=1024,256` gives
    (100, 1024) and (200, 256), the seed's NUM_STATES and BATCH_SIZES arrays; with --sweep too, the grid at
    each pair. Unequal --zip lengths and a key given twice are refused. Every task's params are checked
    against the schema, so a bad key or value fails before anything runs.
    """
    if not params_path.exists():
        raise ConfigError(f"params file not found: {params_path}")
    grid = [_axis("--sweep", sweep) for sweep in sweeps]
    paired = [_axis("--zip", item) for item in zips]
    keys = [axis[0].partition("=")[0] for axis in grid + paired]
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise ConfigError(f"{twice[0]} is swept twice (in --sweep or --zip): give each key once")
    if len({len(axis) for axis in paired}) > 1:
        raise ConfigError("--zip lists must be equally long: " + ", ".join(
            f"{key} has {len(axis)}" for key, axis in zip(keys[len(grid):], paired, strict=True)))
    pairs = list(zip(*paired, strict=True)) if paired else [()]
    text = params_path.read_text()
    tasks = []
    for pair in pairs:
        for point in itertools.product(*grid):
            overrides = [*sets, *pair, *point]
            raw = parse_yaml(text) or {}
            for override in overrides:
                apply_override(raw, override)
            build(Params, raw, where=f"{params_path} + {' '.join(overrides) or 'no overrides'}")
            tasks.append((overrides, raw))
    return tasks


def _axis(flag: str, item: str) -> list[str]:
    """`key=v1,v2,...` as the overrides key=v1, key=v2, ..."""
    key, sep, values = item.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"{flag} {item!r} is not of the form section.key=value1,value2,...")
    return [f"{key}={value.strip()}" for value in values.split(",")]


def capture_data(project: Path) -> dict[str, Any]:
    lock = project / "dvc.lock"
    content = lock.read_text() if lock.exists() else ""
    return {"dvc_lock_sha256": hashlib.sha256(content.encode()).hexdigest(), "dvc_lock": content}


def dvc_cache_dir(project: Path, dvc: str) -> str:
    """The project's DVC cache, which every snapshot shares (on a cluster: a shared filesystem)."""
    done = subprocess.run([dvc, "cache", "dir"], cwd=project, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def make_snapshot(project: Path, commit: str, workdir: Path, params: dict, cache_dir: str) -> None:
    """Check `commit` out into `workdir`, with `params` as its params.yaml and the project's DVC cache."""
    git(project, "clone", "--quiet", "--shared", "--no-checkout", str(project), str(workdir))
    git(workdir, "checkout", "--quiet", "--detach", commit)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # .dvc/config.local is DVC's per-checkout config (git-ignored); written directly, it costs no dvc start-up.
    (workdir / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache_dir}\n")


def keep_commit(project: Path, commit: str, job_id: str) -> None:
    """A ref to the commit a job runs, so that `git gc` never prunes it (a dirty tree's commit is otherwise
    unreachable, and the snapshots borrow the project's objects)."""
    git(project, "update-ref", f"refs/labpipe/jobs/{job_id}", commit)
