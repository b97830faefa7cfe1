import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import REPO, run_labpipe
from labpipe.config import TrackingParams
from labpipe.tracking import CHAMPION, EXPERIMENT_KIND, dvc_md5, register_if_better, run_name, stage_inputs, stage_run
from test_grok import make_grok_project

OFF = TrackingParams(wandb="off", wandb_project="labpipe-tests", system_metrics=False, system_metrics_interval_s=10.0)


@pytest.fixture(autouse=True)
def scratch_directory(tmp_path, monkeypatch):
    """Runs open in an empty directory: no dvc.yaml or params.yaml (so no inputs, no reference for names) but
    those a test puts there, never this checkout's data."""
    monkeypatch.chdir(tmp_path)


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
    offline = dataclasses.replace(OFF, wandb="offline")
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
    assert client.get_experiment(logged.info.experiment_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    version = _log_and_register(1.0, val_loss=0.5)  # a champion's link opens the server's UI
    run = client.get_run(version.run_id)
    assert f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in \
        client.get_model_version("regressor", version.version).description


# ----------------------------------------------------------------------------- what the store reads like


def test_a_run_is_named_by_its_stage_and_the_params_that_differ_from_the_reference():
    reference = {"grok.lr": 0.001, "grok.weight_decay": 0.01, "grok.model": "resnet", "grok.n": [9, 10],
                 "grok.init_from": ""}
    labels = {"grok.weight_decay": "wd", "grok.model": ""}
    params = {**reference, "grok.model": "moe", "grok.lr": 0.002, "grok.weight_decay": 0.03, "grok.n": (9, 10),
              "grok.new_key": True}
    # labelled knobs first in their declared order, then the rest in params order; a tuple equals its list
    assert run_name("grok_train", params, labels, reference) == "grok_train wd=0.03 moe lr=0.002 new_key=true"
    assert run_name("grok_train", reference, labels, reference) == "grok_train"
    assert run_name("grok_train", params, labels, None) == "grok_train"  # nothing to differ from
    uri = "models:/mheight-regressor@champion"
    assert run_name("grok_train", {**reference, "grok.init_from": uri}, labels, reference) == \
        "grok_train init_from=…" + uri[-23:]  # a long value keeps its end
    many = {f"grok.knob_{i}": i for i in range(40)}
    capped = run_name("grok_train", many, labels, {})
    assert len(capped) == 100 and capped.startswith("grok_train knob_0=0 knob_1=1 ") and capped.endswith("…")


def _run():
    [run] = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    return run


def test_a_real_stage_is_named_from_its_overrides_keeps_the_name_when_extended_and_logs_its_inputs(
        mlflow_store, tmp_path, repo_params):
    directory = tmp_path / "project"
    directory.mkdir()
    make_grok_project(directory, repo_params)  # 12 epochs in its params.yaml: the reference (no git here)
    shutil.copy(REPO / "dvc.yaml", directory / "dvc.yaml")
    sets = ["--set", "grok.weight_decay=0.03", "--set", "grok.model=moe"]
    first = run_labpipe(directory, ["grok-train", *sets, "--set", "grok.epochs=6"])
    assert first.returncode == 0, first.stderr
    run = _run()
    assert run.info.run_name == "grok_train wd=0.03 moe epochs=6"
    extended = run_labpipe(directory, ["grok-train", *sets])  # 12 epochs: the same run continues
    assert extended.returncode == 0 and "resuming from" in extended.stdout, extended.stderr
    again = _run()
    assert again.info.run_id == run.info.run_id and again.info.run_name == "grok_train wd=0.03 moe epochs=6"

    inputs = {item.dataset.name: item for item in again.inputs.dataset_inputs}  # logged once, not on resume
    assert sorted(inputs) == ["artifacts/mheight/test.parquet", "artifacts/mheight/train.parquet",
                              "artifacts/mheight/val.parquet"]
    for name, item in inputs.items():
        assert item.dataset.digest == hashlib.md5((directory / name).read_bytes()).hexdigest()  # DVC's md5 of a file
        assert json.loads(item.dataset.source) == {"uri": name} and item.dataset.source_type == "local"
        columns = [column["name"] for column in json.loads(item.dataset.schema)["mlflow_colspec"]]
        assert columns == pq.read_schema(directory / name).names
        assert {tag.key: tag.value for tag in item.tags}["mlflow.data.context"] == "training"

    plain = tmp_path / "plain"
    plain.mkdir()
    make_grok_project(plain, repo_params, epochs=3)
    assert run_labpipe(plain, ["grok-train"]).returncode == 0
    named = {r.info.run_id: r.info.run_name for r in MlflowClient().search_runs([run.info.experiment_id])}
    assert sorted(named.values()) == ["grok_train", "grok_train wd=0.03 moe epochs=6"]  # defaults: the stage alone


def test_a_resumed_run_keeps_its_name_whatever_its_params_now(mlflow_store):
    shutil.copy(REPO / "params.yaml", "params.yaml")  # the reference, without git: 64 states, K 100
    with stage_run(OFF, "hmm_train", {"hmm.hidden_states": 128, "hmm.vocab_size": 200}) as first:
        pass
    assert MlflowClient().get_run(first.run_id).info.run_name == "hmm_train H=128 K=200"
    with stage_run(OFF, "hmm_train", {"hmm.hidden_states": 256}, resume_run_id=first.run_id) as second:
        pass
    assert second.run_id == first.run_id
    assert MlflowClient().get_run(first.run_id).info.run_name == "hmm_train H=128 K=200"


def test_experiments_are_tagged_model_training_new_or_existing_and_a_chosen_kind_stays(mlflow_store):
    key, kind = EXPERIMENT_KIND
    assert (key, kind) == ("mlflow.experimentKind", "custom_model_development")
    client = MlflowClient()
    existing = client.create_experiment("in-context-language-learning")  # as an older labpipe made it
    chosen = client.create_experiment("dormant-neurons", tags={key: "genai_development"})
    for stage in ("mheight_data", "corpus", "dormancy"):
        with stage_run(OFF, stage, {}):
            pass
    assert client.get_experiment_by_name("mheight-grokking").tags[key] == kind  # created so
    assert client.get_experiment(existing).tags[key] == kind  # tagged when found without a kind
    assert client.get_experiment(chosen).tags[key] == "genai_development"


def test_the_dvc_md5_of_files_and_directories_is_the_one_real_dvc_records(tmp_path):
    project = tmp_path / "dvc"
    (project / "tree/sub/deeper").mkdir(parents=True)
    (project / "tree/a.txt").write_text("line\r\nanother\n")  # DVC 3 hashes bytes: no dos2unix
    (project / "tree/.hidden").write_bytes(b"")
    (project / "tree/sub/b.bin").write_bytes(bytes(range(256)) * 1000)
    (project / "tree/sub/deeper/ünïcode name.json").write_text('{"x": 1}')
    (project / "tree/sub/empty_dir").mkdir()
    (project / "file.bin").write_bytes(b"\x00\x01" * 5000)
    ours = {name: dvc_md5(project / name) for name in ("tree", "file.bin")}
    dvc = Path(sys.executable).parent / "dvc"
    for args in (["init", "--no-scm", "-q"], ["add", "-q", "tree", "file.bin"]):
        done = subprocess.run([dvc, *args], cwd=project, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    for name, digest in ours.items():
        [out] = yaml.safe_load((project / f"{name}.dvc").read_text())["outs"]
        assert out["md5"] == digest, name
    [empty] = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]  # this repo's, for its empty data/
    (tmp_path / "empty").mkdir()
    assert dvc_md5(tmp_path / "empty") == empty["md5"]


def test_stage_inputs_are_its_data_deps_with_placeholders_filled_from_its_params():
    assert stage_inputs("hmm_train", {"hmm.vocab_size": 60}) == []  # no dvc.yaml: not a DVC project
    shutil.copy(REPO / "dvc.yaml", "dvc.yaml")
    shutil.copy(REPO / "params.yaml", "params.yaml")  # synth.hmm_checkpoint: artifacts/hmm/model.pt
    for folder in ("train/K60", "test/K60", "train/K100"):
        Path("artifacts/text/tokens", folder).mkdir(parents=True)
    assert stage_inputs("hmm_train", {"hmm.vocab_size": 60}) == \
        [Path("artifacts/text/tokens/train/K60"), Path("artifacts/text/tokens/test/K60")]  # K from the run
    assert stage_inputs("hmm_train", {"hmm.vocab_size": 100}) == [Path("artifacts/text/tokens/train/K100")]
    Path("artifacts/hmm").mkdir()
    Path("artifacts/hmm/model.pt").write_bytes(b"hmm")
    # lm_eval is given lm.* and hmm.eps: ${synth.hmm_checkpoint} comes from params.yaml, as DVC fills it
    assert stage_inputs("lm_eval", {"lm.lr": 0.1}) == [Path("artifacts/hmm/model.pt")]


def _sampled(client: MlflowClient, run_id: str) -> set[str]:
    return {key for key in client.get_run(run_id).data.metrics if key.startswith("system/")}


def test_a_training_run_logs_system_metrics_unless_they_are_off(mlflow_store):
    client = MlflowClient()
    on = dataclasses.replace(OFF, system_metrics=True, system_metrics_interval_s=1.0)
    with stage_run(on, "grok_train", {}) as run:
        deadline = time.monotonic() + 120
        while not _sampled(client, run.run_id) and time.monotonic() < deadline:  # the first sample after 1 s
            time.sleep(0.2)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= _sampled(client, run.run_id)
    for tracking, stage in ((dataclasses.replace(on, system_metrics=False), "grok_train"),
                            (on, "mheight_data")):  # off, and not a training stage
        with stage_run(tracking, stage, {}) as quiet:
            time.sleep(3)  # three intervals
        assert not _sampled(client, quiet.run_id), stage


@pytest.mark.gpu
def test_system_metrics_include_the_gpu(mlflow_store):
    client = MlflowClient()
    on = dataclasses.replace(OFF, system_metrics=True, system_metrics_interval_s=1.0)
    with stage_run(on, "lm_train", {}) as run:
        deadline = time.monotonic() + 120
        while not _sampled(client, run.run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= \
        _sampled(client, run.run_id)


def test_registered_models_and_champion_versions_are_described(mlflow_store):
    shutil.copy(REPO / "dvc.yaml", "dvc.yaml")
    Path("artifacts/mheight").mkdir(parents=True)
    for split in ("train", "val", "test"):
        pd.DataFrame({"n": [9], "height": [float(len(split))]}).to_parquet(f"artifacts/mheight/{split}.parquet")
    client = MlflowClient()

    def md5(path: str) -> str:
        return hashlib.md5(Path(path).read_bytes()).hexdigest()

    trains = []
    for scale, val_loss, n in ((1.0, 0.5, 9), (2.0, 0.25, 10)):  # each champion sees another train.parquet
        pd.DataFrame({"n": [n], "height": [2.0]}).to_parquet("artifacts/mheight/train.parquet")
        trains.append(md5("artifacts/mheight/train.parquet"))
        version = _log_and_register(scale, val_loss)
        run = client.get_run(version.run_id)
        described = client.get_model_version("regressor", version.version).description
        assert f"val_loss = {val_loss:.6g}" in described
        assert run.info.run_id in described and run.info.run_name in described
        assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in described
    model = client.get_registered_model("regressor").description
    assert "mheight-grokking" in model and "`val_loss`" in model and "lower is better" in model
    assert "version 2" in model and trains[0] != trains[1] and trains[0] not in model  # the champion's data now
    for split in ("train", "val", "test"):
        path = f"artifacts/mheight/{split}.parquet"
        assert f"`{path}`: md5 `{md5(path)}`" in model
    assert 'mlflow.pytorch.load_model("models:/regressor@champion")' in model


def test_the_system_metrics_interval_is_bounded_and_a_bad_one_is_one_line(project):
    directory, _params = project
    refused = run_labpipe(directory, ["grok-train", "--set", "tracking.system_metrics_interval_s=0.5"])
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == \
        ["labpipe grok-train: error: params.yaml: tracking.system_metrics_interval_s must be >= 1, got 0.5"]
