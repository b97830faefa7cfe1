"""`labpipe grok-report`: the grok_train runs of the tracking store side by side (the wd sweep, the two heads).

For every finished grok_train run (or the runs named): the params in which the runs differ, the best val and
the test log2-MSE, the grokking epoch, the epochs run and why the run stopped, in runs.csv and a printed table;
and the val and train curves of all of them in one figure, each run's grokking epoch marked, in curves.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from labpipe.errors import InputError, UserError
from labpipe.files import atomic_path

STAGE = "grok_train"


def finished_runs(run_ids: list[str]) -> list:
    """The MLflow runs to compare: those named, else every FINISHED grok_train run of the line's experiment."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from labpipe.registry import line_of
    from labpipe.tracking import check_store, tracking_uri

    check_store()
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise InputError(f"--runs: no run {run_id} in {tracking_uri()}") from None
        return runs
    experiment = client.get_experiment_by_name(line_of(STAGE).experiment)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], f"tags.`labpipe.stage` = '{STAGE}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"])
    if not runs:
        raise InputError(f"no finished {STAGE} run in {tracking_uri()}: run `make train-grok` or `make sweep-grok`")
    return runs


def differing_params(runs: list) -> list[str]:
    """The grok.* params whose values are not the same in every run: what tells the runs apart."""
    keys = sorted({key for run in runs for key in run.data.params if key.startswith("grok.")})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def shown(value: str | None, width: int = 32) -> str | None:
    """A param's value as the table and legend show it: long ones (lists of expert paths) cut short."""
    return value if value is None or len(value) <= width else value[: width - 3] + "..."


def curves(run, metric: str) -> tuple[list[int], list[float]]:
    from mlflow import MlflowClient

    history = sorted(MlflowClient().get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def summary(runs: list, keys: list[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        epochs, val = curves(run, "val_loss")
        best = min(range(len(val)), key=val.__getitem__) if val else None
        metrics, tags = run.data.metrics, run.data.tags
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            **{key: shown(run.data.params.get(key)) for key in keys},
            "best_val_loss": val[best] if val else None,
            "best_epoch": epochs[best] if val else None,
            "test_loss": metrics.get("test_loss"),
            "grokking_epoch": tags.get("grokking_epoch", "none"),
            "epochs_run": tags.get("epochs_run"),
            "stop_reason": tags.get("stop_reason"),
        })
    return pd.DataFrame(rows)


def plot(runs: list, table: pd.DataFrame, keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (val_ax, train_ax) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for run, (_, row) in zip(runs, table.iterrows(), strict=True):
        label = ", ".join(f"{key.removeprefix('grok.')}={row[key]}" for key in keys) or row["run_name"]
        (line,) = val_ax.plot(*curves(run, "val_loss"), label=label)
        train_ax.plot(*curves(run, "train_loss"), color=line.get_color(), linewidth=1)
        if row["grokking_epoch"] not in ("none", None):
            for ax in (val_ax, train_ax):
                ax.axvline(float(row["grokking_epoch"]), color=line.get_color(), linestyle="--", alpha=0.6)
    val_ax.set(ylabel="val (log2 h - log2 h_hat)^2", yscale="log",
               title="grok_train runs (dashed: grokking epoch)")
    train_ax.set(xlabel="epoch", ylabel="train (log2 h - log2 h_hat)^2", yscale="log")
    val_ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe grok-report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="these runs (default: every "
                        "finished grok_train run)")
    parser.add_argument("--out", default="artifacts/grok-report", help="folder of runs.csv and curves.png")
    args = parser.parse_args(argv)
    try:
        runs = finished_runs(args.runs)
    except UserError as error:
        print(f"labpipe grok-report: error: {error}", file=sys.stderr)
        return error.exit_code
    keys = differing_params(runs)
    table = summary(runs, keys)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "runs.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot(runs, table, keys, out / "curves.png")
    print(table.drop(columns=["run_id"]).to_string(index=False))
    print(f"wrote {out / 'runs.csv'} and {out / 'curves.png'}")
    return 0
