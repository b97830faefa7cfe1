"""End to end: the real `dvc repro` and `dvc exp run` on a temp copy of the project at a tiny size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import copy_project, tiny_params, write_params

pytestmark = pytest.mark.slow


def _sh(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_dvc_repro_runs_the_graph_tracks_it_in_mlflow_and_registers_a_champion(tmp_path, repo_params):
    project = tmp_path / "project"
    copy_project(project)
    write_params(project, tiny_params(repo_params))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": uri, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _sh(["git", "init", "-q", "-b", "main"], project, env)
    _sh(["git", "add", "-A"], project, env)
    _sh(["git", "commit", "-qm", "tiny"], project, env)
    (project / "data").mkdir()  # what `make run` does on a fresh clone: data.dvc tracks the empty folder

    out = _sh(["dvc", "repro"], project, env)
    stages = ("mheight_data", "mheight_subsample", "grok_train", "corpus", "tokenize", "hmm_train", "hmm_eval",
              "synth", "lm_train", "lm_eval", "dormancy", "activations", "crosscoder_train")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    dataset = pd.read_parquet(project / "artifacts/mheight/dataset.parquet")
    assert len(dataset) == 7 * 12  # 7 groups with n=9, k in {4, 5}
    for split in ("train", "val", "test"):  # tiny_params: 4 of each per group
        assert len(pd.read_parquet(project / f"artifacts/mheight/{split}.parquet")) == 7 * 4
    metrics = json.loads((project / "artifacts/grok/metrics.json").read_text())

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mheight-grokking")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["labpipe.stage"] for r in runs) == ["grok_train", "mheight_data", "mheight_subsample"]
    champion = client.get_model_version_by_alias("mheight-regressor", "champion")
    grok_run = next(r for r in runs if r.data.tags["labpipe.stage"] == "grok_train")
    assert champion.run_id == grok_run.info.run_id
    assert grok_run.data.metrics["val_loss"] == pytest.approx(metrics["final_val_loss"])

    shown = json.loads(_sh(["dvc", "metrics", "show", "--json"], project, env))
    assert json.dumps(metrics["best_val_loss"]) in json.dumps(shown)

    hmm_experiment = client.get_experiment_by_name("in-context-language-learning")
    hmm_runs = client.search_runs([hmm_experiment.experiment_id])
    assert sorted(r.data.tags["labpipe.stage"] for r in hmm_runs) == ["corpus", "hmm_eval", "hmm_train", "lm_eval",
                                                                      "lm_train", "synth", "tokenize"]
    hmm_metrics = json.loads((project / "artifacts/hmm/metrics.json").read_text())
    assert float(client.get_model_version_by_alias("hmm-K60", "champion").tags["metric.heldout_ll_per_token"]) \
        == pytest.approx(hmm_metrics["best_heldout_ll_per_token"])
    eval_metrics = json.loads((project / "artifacts/hmm/eval/metrics.json").read_text())
    assert eval_metrics["sequences"]["overall"] > 0
    lm_metrics = json.loads((project / "artifacts/lm/metrics.json").read_text())
    assert float(client.get_model_version_by_alias("lm-synthetic", "champion").tags["metric.val_loss"]) \
        == pytest.approx(lm_metrics["best_val_loss"])
    assert (project / "artifacts/crosscoder/metrics.json").exists()
    dormancy = pd.read_csv(project / "artifacts/dormancy/results.csv")
    assert sorted(dormancy.step.unique()) == [2, 4]  # one revision per lm_train checkpoint

    # Every stage's run logged the data it read as datasets whose digests are the md5s DVC locked for those deps
    # (files and .dir listings alike), is named by its stage alone (params.yaml as committed), and its
    # experiment opens on its runs.
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    every_run = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["labpipe.stage"] for r in every_run) == sorted(stages)
    for run in every_run:
        stage = run.data.tags["labpipe.stage"]
        assert run.info.run_name == stage
        locked = {dep["path"]: dep["md5"] for dep in lock[stage]["deps"] if not dep["path"].startswith("src/")}
        assert {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs} == locked, stage
        assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == \
            "custom_model_development"

    again = _sh(["dvc", "repro"], project, env)
    assert "Running stage" not in again  # nothing changed, nothing reruns

    _sh(["git", "add", "-A"], project, env)
    _sh(["git", "commit", "-qm", "baseline"], project, env)
    sweep = _sh(["dvc", "exp", "run", "-S", "grok.weight_decay=0.03"], project, env)
    assert "Running stage 'grok_train'" in sweep and "Running stage 'mheight_data'" not in sweep
    assert "Running stage 'hmm_train'" not in sweep
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], project, env))
    [(name, exp_metrics)] = [(rev.get("name"), rev["data"]["metrics"]["artifacts/grok/metrics.json"]["data"])
                             for rev in _revisions(shown)
                             if rev["data"]["params"]["params.yaml"]["data"]["grok"]["weight_decay"] == 0.03
                             and rev.get("name")]  # the experiment, not the workspace it left behind
    grok_runs = client.search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'grok_train'")
    assert len(grok_runs) == 2
    swept = next(r for r in grok_runs if r.data.params["grok.weight_decay"] == "0.03")
    assert swept.data.tags["dvc.exp_name"] == name  # the MLflow run names its DVC experiment
    assert swept.info.run_name == "grok_train wd=0.03"  # -S edited params.yaml: the commit is the reference
    # ... and `dvc exp show` compares the same numbers that MLflow holds for it.
    assert exp_metrics["final_val_loss"] == pytest.approx(swept.data.metrics["val_loss"])


def _revisions(shown):
    """Every revision record (baseline, workspace, experiments) in `dvc exp show --json`."""
    for node in shown if isinstance(shown, list) else [shown]:
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "params" in node["data"]:
                yield node
            for value in node.values():
                if isinstance(value, list | dict):
                    yield from _revisions(value)
