"""What a report reads of an MLflow run: its params as they stand, a label that tells it from the others, its
metric histories, the data it read and how long it ran."""

from __future__ import annotations

import ast
from collections.abc import Iterable

import pandas as pd
from tqdm import tqdm

from labpipe import registry

# Params that never change what a run measured (where it ran, how often it saved, the champion's band): the
# registry's not-trajectory keys, less those that decide what a run reports (the final metrics' rows, the
# grokking rule and the stop rule built on it).
MEASURED = {"eval_rows", "grokking_window", "grokking_drop", "stop_after_plateau"}
IGNORED = {*registry.NOT_TRAJECTORY,
           *(key for stage in registry.STAGES.values() if stage.training
             for key in stage.training.also_not_trajectory)} - MEASURED


def stage(run) -> str:
    return run.data.tags.get("labpipe.stage", "")


def params(run) -> dict[str, str]:
    """The run's params as they stand now: MLflow keeps a param's first value, and a resumed run that changed
    one (an extended run length) records it as the tag `labpipe.changed.<key>: old -> new`."""
    current = dict(run.data.params)
    for tag, change in run.data.tags.items():
        if tag.startswith("labpipe.changed."):
            current[tag.removeprefix("labpipe.changed.")] = change.partition(" -> ")[2]
    return current


def result_params(run) -> dict[str, str]:
    """The params that change what the run measured."""
    return {key: value for key, value in params(run).items() if key.rpartition(".")[2] not in IGNORED}


def value(text: str | None):
    """A param as the Python value it was logged from (MLflow stores str(value)); text that is no literal
    (a name such as `resnet`) stays text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return text


def sort_key(text: str):
    """Numbers in numeric order, before any text."""
    number = value(text)
    return (0, number, "") if isinstance(number, int | float) and not isinstance(number, bool) else (1, 0, str(text))


def differing(runs: list) -> list[str]:
    """The result params whose values are not the same in every run of a stage (a run without the key counts
    as its own value), over the runs' stages: what tells the runs apart. The knobs the lines label in run names
    come first, in the registry's order (H before K), then the others by name."""
    keys = set()
    for name in {stage(run) for run in runs}:
        same_stage = [result_params(run) for run in runs if stage(run) == name]
        every = {key for p in same_stage for key in p}
        keys |= {key for key in every if len({p.get(key) for p in same_stage}) > 1}
    known = [key for line in registry.LINES for key in line.labels]
    return sorted(keys, key=lambda key: (known.index(key) if key in known else len(known), key))


def short(key: str) -> str:
    """A param without its section: grok.weight_decay -> weight_decay."""
    return key.partition(".")[2] or key


def labels(runs: list, keys: list[str]) -> dict[str, str]:
    """run id -> its label: the differing params' values, as the line labels them in run names (`wd=0.01 moe`;
    registry.Line.labels) or by their key without its section (`lr=0.002`), else its DVC experiment, else its
    run name; unique within a stage (a repeat gets its id's first 8 characters)."""
    named = {}
    for run in runs:
        p, tags = params(run), run.data.tags
        known = registry.line_of(stage(run)).labels
        words = [f"{known.get(key, short(key))}={p[key]}".removeprefix("=") for key in keys if key in p]
        named[run.info.run_id] = " ".join(words) or tags.get("dvc.exp_name") or run.info.run_name \
            or run.info.run_id[:8]
    for run in runs:
        twins = [other for other in runs if stage(other) == stage(run)
                 and named[other.info.run_id] == named[run.info.run_id]]
        if len(twins) > 1:
            named[run.info.run_id] += f" ({run.info.run_id[:8]})"
    return named


def seconds(run) -> float | None:
    """Wall time from the run's start to its end (None while it runs)."""
    end = run.info.end_time
    return None if end is None else (end - run.info.start_time) / 1000


def data_versions(run) -> str:
    """The datasets the run logged as inputs, `name@digest` (empty for runs logged without them)."""
    inputs = run.inputs.dataset_inputs if run.inputs is not None else []
    return ", ".join(f"{item.dataset.name}@{item.dataset.digest}" for item in inputs)


def histories(wanted: Iterable[tuple[object, str]]) -> dict[tuple[str, str], pd.Series]:
    """(run id, metric) -> the metric's values indexed by step, for each (run, metric) wanted: the last value
    logged at a step wins (a resumed run may log a step twice). Missing metrics give empty series."""
    from mlflow import MlflowClient

    client, found = MlflowClient(), {}
    wanted = list(wanted)
    with tqdm(wanted, desc="reading metric histories", unit="metric", leave=False) as bar:
        for run, metric in bar:
            points = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
            steps = {m.step: m.value for m in points}
            found[run.info.run_id, metric] = pd.Series(steps, dtype=float).sort_index()
    return found
