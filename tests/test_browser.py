"""What people look at, opened in headless Chromium (make test-browser): mlflow ui on a store of real runs, and
the HTML reports. The DOM is read, not pixels; a screenshot of each page is kept in test-results/."""

import shutil

import pytest
from mlflow import MlflowClient

from browser import chromium, images, screenshot, wait_for
from conftest import REPO, run_labpipe
from labpipe import registry
from test_grok import make_grok_project
from test_report import grok_sweep, hmm_sweep, report

pytestmark = pytest.mark.browser


def test_mlflow_ui_shows_the_training_runs_under_their_readable_names(project, mlflow_server):
    directory, repo_params = project
    uri, _ = mlflow_server
    make_grok_project(directory, repo_params)
    shutil.copy(REPO / "dvc.yaml", directory)  # the stage's DVC deps: the datasets a run logs
    for overrides in ([], ["--set", "grok.weight_decay=0.03"]):
        done = run_labpipe(directory, ["grok-train", *overrides])
        assert done.returncode == 0, done.stderr[-2000:]
    experiment = MlflowClient().get_experiment_by_name(registry.line_of("grok_train").experiment)
    client = MlflowClient()
    runs = [client.get_run(run.info.run_id) for run in client.search_runs([experiment.experiment_id])]
    names = sorted(run.info.run_name for run in runs)
    assert names == ["grok_train", "grok_train wd=0.03"]
    datasets = {(d.dataset.name, d.dataset.digest) for run in runs for d in run.inputs.dataset_inputs}
    assert {name for name, _ in datasets} >= {"artifacts/mheight/train.parquet", "artifacts/mheight/val.parquet"}

    with chromium() as driver:
        driver.get(f"{uri}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")  # `make ui`'s
        text = wait_for(driver, lambda: all(name in (body := driver.find_element("tag name", "body").text)
                                            for name in names) and body, "both run names in the runs table")
        assert "Run Name" in text  # the runs table, not MLflow 3's GenAI overview
        # the Dataset column: which data version each run saw (the UI shows a dataset's name and its digest)
        assert any(name in text and digest[:8] in text for name, digest in datasets), text[:2000]
        shot = screenshot(driver, "mlflow-experiment")
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("line,sweep", [("grok", grok_sweep), ("hmm", hmm_sweep)])
def test_the_html_report_renders_with_every_figure_decoded(mlflow_store, tmp_path, monkeypatch, line, sweep):
    monkeypatch.chdir(tmp_path)
    sweep()
    out = tmp_path / "reports" / line
    code, _, stderr = report(out, line)
    assert code == 0, stderr
    pngs = sorted(out.glob("*.png"))
    assert pngs
    with chromium() as driver:
        driver.get((out / "report.html").as_uri())
        shown = wait_for(driver, lambda: (found := images(driver)) and all(i["complete"] for i in found) and found,
                         "every image loaded")
        assert len(shown) == len(pngs)
        assert all(i["src"].startswith("data:image/png;base64,") and i["width"] > 100 and i["height"] > 100
                   for i in shown), shown  # embedded, and decoded to a real picture
        text = driver.find_element("tag name", "body").text
        for heading in ("Summary", "Setup", "Results", "Observations", "How to reproduce"):
            assert heading in text
        screenshot(driver, f"report-{line}")
