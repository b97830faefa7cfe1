import mlflow
import pytest
import torch
from mlflow import MlflowClient

from labpipe.config import TrackingParams
from labpipe.tracking import CHAMPION, register_if_better, stage_run

OFF = TrackingParams(wandb="off", wandb_project="labpipe-tests")


def test_a_stage_run_logs_params_metrics_artifacts_and_outputs(mlflow_store, tmp_path):
    (tmp_path / "plot.png").write_bytes(b"png")
    with stage_run(OFF, "mheight_data", {"grok.lr": 0.001, "mheight.n": [9, 10]}) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_artifact(tmp_path / "plot.png", "plots")
        run.log_outputs(["artifacts/a.parquet", "artifacts/b.json"])
    client = MlflowClient()
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"grok.lr": "0.001", "mheight.n": "[9, 10]"}
    assert logged.data.tags["labpipe.stage"] == "mheight_data"
    assert logged.data.tags["labpipe.line"] == "mheight-grokking"
    assert logged.data.tags["dvc.outs"] == "artifacts/a.parquet,artifacts/b.json"
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/plot.png"]
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.name == "mheight-grokking"  # the experiment of the stage's research line
    # Artifacts live beside the database, in mlruns/, whatever the working directory was.
    assert experiment.artifact_location == (tmp_path / "mlruns" / "mheight-grokking").as_uri()


def test_a_failing_stage_marks_its_run_failed(mlflow_store):
    with pytest.raises(ValueError), stage_run(OFF, "mheight_data", {}) as run:
        raise ValueError("bad input")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"


def test_resume_continues_the_same_run(mlflow_store):
    with stage_run(OFF, "grok_train", {"a": 1}) as first:
        first.log_metrics({"loss": 2.0}, step=1)
    with stage_run(OFF, "grok_train", {"a": 1}, resume_run_id=first.run_id) as second:
        second.log_metrics({"loss": 1.0}, step=2)
    assert second.run_id == first.run_id
    assert [m.value for m in MlflowClient().get_metric_history(first.run_id, "loss")] == [2.0, 1.0]
    with stage_run(OFF, "grok_train", {"a": 1}, resume_run_id="0" * 32) as fresh:  # not in this store
        pass
    assert fresh.run_id != first.run_id


def _log_and_register(scale: float, val_loss: float, revision: int = 1):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(scale)
        model.bias.zero_()
    with stage_run(OFF, "grok_train", {}) as run:
        version = register_if_better(run.log_torch_model(model), "regressor", "val_loss", val_loss,
                                     revision=revision)
    return version


def test_champion_moves_only_when_the_metric_improves(mlflow_store):
    assert int(_log_and_register(1.0, val_loss=0.5).version) == 1
    assert _log_and_register(2.0, val_loss=0.7) is None  # worse: not registered, champion stays
    assert _log_and_register(3.0, val_loss=0.5) is None  # a tie is no improvement
    assert int(_log_and_register(4.0, val_loss=0.2).version) == 2
    client = MlflowClient()
    champion = client.get_model_version_by_alias("regressor", CHAMPION)
    assert int(champion.version) == 2 and float(champion.tags["metric.val_loss"]) == 0.2
    loaded = mlflow.pytorch.load_model(f"models:/regressor@{CHAMPION}")
    assert loaded(torch.tensor([[1.0, 2.0]])).item() == pytest.approx(4.0 * 3)


def test_a_champion_whose_metric_was_defined_otherwise_is_replaced_not_compared(mlflow_store):
    """registry.Champion.revision: a new definition of the metric makes the old champion's value meaningless."""
    assert int(_log_and_register(1.0, val_loss=0.1).version) == 1
    assert _log_and_register(2.0, val_loss=0.5) is None  # same definition, worse
    replaced = _log_and_register(3.0, val_loss=0.5, revision=2)  # worse in number, but under another definition
    assert int(replaced.version) == 2 and replaced.tags["metric_revision"] == "2"
    assert _log_and_register(4.0, val_loss=0.6, revision=2) is None  # from now on compared again
    assert int(MlflowClient().get_model_version_by_alias("regressor", CHAMPION).version) == 2


def test_wandb_offline_mirror_records_the_same_metrics(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    offline = TrackingParams(wandb="offline", wandb_project="labpipe-tests")
    with stage_run(offline, "grok_train", {"grok.lr": 0.1}) as run:
        run.log_metrics({"mirrored_loss": 0.25}, step=1)
    [run_dir] = (tmp_path / "wandb").glob(f"offline-run-*-{run.run_id}")  # same id as the MLflow run
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"mirrored_loss" in record and b"grok.lr" in record


@pytest.mark.slow
def test_stages_log_to_a_remote_mlflow_server_over_http(mlflow_server, tmp_path):
    uri, artifact_dir = mlflow_server
    (tmp_path / "metrics.json").write_text('{"loss": 0.5}')
    with stage_run(OFF, "dormancy", {"grok.lr": 0.01}) as run:
        run.log_metrics({"loss": 0.5}, step=3)
        run.log_artifact(tmp_path / "metrics.json")
    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.data.metrics["loss"] == 0.5 and logged.data.params["grok.lr"] == "0.01"
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["metrics.json"]
    # The artifact went through the server to its own store, not to a local mlruns/.
    assert list(artifact_dir.rglob("metrics.json")) and not (tmp_path / "mlruns").exists()
