"""A report as an MLflow run of its own, in its line's experiment: tagged labpipe.report=<line> (so that no
report ever selects it as an input), its summary as the run's description, every file of the report folder
(report.md, report.html, the PNGs and CSVs) as an artifact."""

from __future__ import annotations

from pathlib import Path

from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from labpipe.report.select import REPORT_TAG


def log_report(experiment: str, line: str, out: Path, runs: list, summary: str) -> str:
    """The report run's id."""
    import mlflow

    from labpipe.tracking import experiment_id

    ids = ",".join(run.info.run_id for run in runs)
    tags = {REPORT_TAG: line, "labpipe.report.inputs": str(len(runs)), "mlflow.note.content": summary}
    if len(ids) <= MAX_TAG_VAL_LENGTH:  # else setup.csv, an artifact, is where they are
        tags["labpipe.report.runs"] = ids
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"report {line}", tags=tags) as run:
        mlflow.log_artifacts(str(out))
    return run.info.run_id
