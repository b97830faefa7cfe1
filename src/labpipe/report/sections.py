"""The sections every line's report shares: the setup (what the runs are, what differs between them, the data
and code they ran on) and how to reproduce them (the commands, from each run's params)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd

from labpipe import registry
from labpipe.config import ConfigError, parse_yaml
from labpipe.inputs import read_text
from labpipe.report import runs as read
from labpipe.report.document import Block, Code, Table

UNKNOWN = "(not recorded)"
EMPTY = '""'  # an empty param, visibly


def setup(runs: list, labels: dict[str, str], keys: list[str], experiment: str, uri: str) -> list[Block]:
    """Which runs, the params that differ (and those they share), and per run its data versions (the datasets
    it logged, with their digests: DVC's hashes), DVC experiment and git commit."""
    stages = ", ".join(sorted({read.stage(run) for run in runs}))
    blocks: list[Block] = [f"{len(runs)} runs of {stages} from experiment {experiment!r} of the MLflow store {uri}."]
    if keys:
        blocks.append("The runs differ in " + "; ".join(f"{key} ({', '.join(values(runs, key))})" for key in keys)
                      + ".")
    else:
        blocks.append("The runs share every param that changes what they measure.")
    rows = [{"run": labels[run.info.run_id], "run_id": run.info.run_id, "stage": read.stage(run),
             "status": run.info.status, **{key: read.params(run).get(key) for key in keys},
             "dvc_exp": run.data.tags.get("dvc.exp_name", ""),
             "git_commit": run.data.tags.get("mlflow.source.git.commit", "")[:12] or UNKNOWN,
             "data": read.data_versions(run) or UNKNOWN} for run in runs]
    blocks.append(Table("setup", "The runs: their differing params, DVC experiment, commit and data versions",
                        pd.DataFrame(rows)))
    shared = shared_params(runs, keys)
    if shared:
        blocks.append("Shared by every run: " + ", ".join(f"{key}={value or EMPTY}" for key, value in shared.items())
                      + ".")
    return blocks


def values(runs: list, key: str) -> list[str]:
    """The values `key` takes in the runs, in order."""
    return sorted({read.params(run)[key] for run in runs if key in read.params(run)}, key=read.sort_key)


def shared_params(runs: list, keys: list[str]) -> dict[str, str]:
    """The result params every run has, with one value, but the differing ones."""
    every = [read.result_params(run) for run in runs]
    common = set.intersection(*(set(p) for p in every)) - set(keys)
    return {key: every[0][key] for key in sorted(common) if len({p[key] for p in every}) == 1}


# ----------------------------------------------------------------------------- how to reproduce


def reproduce(line: str, runs: list, keys: list[str], sweep: tuple[str, dict[str, str]] | None,
              params_file: Path = Path("params.yaml")) -> list[Block]:
    """Per run, its DVC experiment (dvc exp run -S ...) and the stage by hand (labpipe <verb> --set ...), with
    the params that differ from `params_file` (when there is none, those that differ between the runs); the
    make target of the sweep when it covers every differing param; and this report's command."""
    base = flat_yaml(params_file)
    dvc, verbs, commits = [], [], {run.data.tags.get("mlflow.source.git.commit") for run in runs}
    for run in runs:
        p = read.result_params(run)
        # a key params.yaml lacks cannot be set: an older labpipe's
        changed = [key for key in keys if key in p] if base is None else \
            [key for key in sorted(p) if key in base and read.value(p[key]) != base[key]]
        assignments = [shlex.quote(f"{key}={yaml_value(p[key])}") for key in changed]
        dvc.append(" ".join(["dvc exp run", *(f"-S {a}" for a in assignments)]))
        verb = registry.stage(read.stage(run)).verb
        verbs.append(" ".join([f"labpipe {verb}", *(f"--set {a}" for a in assignments)]))
    said = [f"Each run's params that differ from {params_file}" if base is not None
            else f"Each run's differing params (there is no {params_file} here to compare with)"]
    if len(commits) == 1 and None not in commits:
        said.append(f"at commit {next(iter(commits))[:12]} (git checkout it first)")
    lines = ["# " + ", ".join(said) + ": as a DVC experiment (its downstream stages too)", *unique(dvc),
             "# or each stage by hand", *unique(verbs)]
    if sweep is not None and keys and set(keys) <= set(sweep[1]):
        target, variables = sweep
        lines += ["# the whole sweep", f"make {target} " + " ".join(
            f"{variables[key]}={shlex.quote(' '.join(values(runs, key)))}" for key in keys)]
    lines += ["# this report", f"labpipe report {line} --runs {','.join(run.info.run_id for run in runs)}"]
    return [Code(lines)]


def unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def flat_yaml(path: Path) -> dict | None:
    """`section.key -> value` of a params file as DVC reads it, or None when there is none (unchecked against
    the schema: a report compares values, it runs nothing)."""
    if not path.is_file():
        return None
    tree = parse_yaml(read_text(path), where=str(path)) or {}
    return {f"{section}.{key}": value for section, keys in tree.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def yaml_value(text: str) -> str:
    """A logged param as the value of -S/--set: YAML that DVC and labpipe's loader read back as the value it was
    logged from."""
    return as_yaml(read.value(text))


def as_yaml(value) -> str:
    """Plain where that reads back as `value`, JSON (which is YAML) otherwise; a float always with its dot, as
    labpipe's loader reads 1e-05 as text but 1.0e-05 as a number."""
    if isinstance(value, float):
        return re.sub(r"^(-?\d+)(?=e)", r"\1.0", repr(value))
    if isinstance(value, list | tuple):
        return "[" + ",".join(json.dumps(v) if isinstance(v, str) else as_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        try:
            plain = parse_yaml(value) == value
        except ConfigError:
            plain = False
        return value if plain else json.dumps(value)
    return json.dumps(value)  # int, bool, None
