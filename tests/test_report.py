"""labpipe report: each line's report from real MLflow stores, against the runs' own metrics.

The stores hold runs logged through labpipe.tracking.stage_run (the stages' tags, params and datasets) with the
metric names the stages log (grok/train.py, hmm/train.py, hmm/evaluate.py, lm/train.py, lm/evaluate.py,
crosscoder/train.py, dormancy/analysis.py), plus real grok_train runs. Every figure's data is read back from the
CSV the report wrote and compared with the logged metrics; every number an observation quotes is parsed out of
the text and compared with the metric it names, computed here; report.html is checked self-contained, report.md
for its links, the report's own MLflow run for its tag and artifacts; the selection flags for exactly their runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from conftest import REPO
from labpipe.cli import main as cli
from labpipe.config import flatten, load_params
from labpipe.tracking import stage_run

PARAMS = load_params(REPO / "params.yaml")


# ----------------------------------------------------------------------------- stores, as the stages fill them


def section(name: str, **changed) -> dict:
    """`<name>.*` of the repo's params.yaml with `changed`, flattened as the stages log them."""
    params = load_params(REPO / "params.yaml", [f"{name}.{key}={value}" for key, value in changed.items()])
    return flatten(getattr(params, name), f"{name}.")


def logged(stage: str, params: dict, series: dict[str, dict[int, float]], tags: dict | None = None,
           dvc_exp: str | None = None, status: str = "FINISHED") -> str:
    """A run of `stage` opened by stage_run (as the stage opens it, inside DVC experiment `dvc_exp`), with these
    metric histories (metric -> {step: value}) and tags; returns its id."""
    environment = {"DVC_EXP_NAME": dvc_exp} if dvc_exp else {}
    with mock.patch.dict(os.environ, environment), contextlib.suppress(RuntimeError), \
            stage_run(PARAMS.tracking, stage, params) as run:
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, int(step)) for key, points in series.items()
                   for step, v in points.items()]
        for start in range(0, len(metrics), 1000):
            MlflowClient().log_batch(run.run_id, metrics=metrics[start:start + 1000])
        run.set_tags(tags or {})
        if status != "FINISHED":
            raise RuntimeError(status)  # the run ends FAILED, as a stage's that raised
    return run.run_id


def at(steps, values) -> dict:
    """{step: value}: a metric's history."""
    return dict(zip(steps, values, strict=True))


def grok_run(weight_decay: float, grokking: int | None, spikes: tuple[int, ...], seed: int, epochs: int = 120,
             tags: dict | None = None, **kwargs) -> tuple[str, dict]:
    """A grok_train run: train loss every epoch (rising for 10 epochs after grokking, as in the seed), val
    loss every 5 epochs (a plateau, then a drop at `grokking`; creeping up at the end), norms, spikes, per-group
    val loss, the test loss, the grokking epoch and how it ended."""
    rng = np.random.default_rng(seed)
    every = np.arange(1, epochs + 1)
    train = 2.0 / np.sqrt(every) * (1 + 0.05 * rng.random(epochs))
    if grokking:
        train[(every > grokking) & (every <= grokking + 10)] *= 1.4
    val_epochs = np.arange(5, epochs + 1, 5)
    val = 3.1 + 0.02 * rng.random(len(val_epochs))
    if grokking:
        val[val_epochs > grokking] = 1.8 + 0.3 * (val_epochs[val_epochs > grokking] / epochs) ** 4 \
            + 0.01 * rng.random((val_epochs > grokking).sum())
    series = {"train_loss": at(every, train), "val_loss": at(val_epochs, val),
              "weight_norm": at(every, 30 - weight_decay * every),
              "update_ratio": at(every, 1e-2 / every), "grad_norm": at(every, 1 / every),
              "slingshot": {s: 1.0 for s in spikes}, "spike/val_loss_change": {s: -0.1 * (i + 1)
                                                                               for i, s in enumerate(spikes)},
              **{f"val_loss/n9_k{k}_m{m}": at(val_epochs, val * m / 3) for k, m in ((4, 2), (4, 3), (5, 3))},
              "test_loss": {epochs: val.min() + 0.05}}
    if grokking:
        series["grokking_epoch"] = {epochs: grokking}
    tags = {"grokking_epoch": grokking or "none", "epochs_run": epochs, "stop_reason": "grok.epochs", **(tags or {})}
    return logged("grok_train", section("grok", weight_decay=weight_decay), series, tags, **kwargs), series


def grok_sweep() -> dict[str, dict]:
    """Seed 004's sweep: wd 0.01 groks at 60, wd 0.03 at 40 (and spikes), wd 0.1 never (two spikes)."""
    runs = [grok_run(0.01, 60, (), seed=0), grok_run(0.03, 40, (41,), seed=1), grok_run(0.1, None, (30, 70), seed=2)]
    return dict(runs)


# ----------------------------------------------------------------------------- reading a report back


def labpipe(*argv: str) -> tuple[int, str, str]:
    """`labpipe ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(list(argv))
    return code, out.getvalue(), err.getvalue()


def report(directory: Path, *argv: str) -> tuple[int, str, str]:
    """`labpipe report ARGV --out directory`."""
    return labpipe("report", *argv, "--out", str(directory))


def observations(directory: Path) -> list[str]:
    text = (directory / "report.md").read_text()
    section_text = text.split("## Observations")[1].split("## How to reproduce")[0]
    return [line[2:] for line in section_text.splitlines() if line.startswith("- ")]


def said(directory: Path, pattern: str) -> list[re.Match]:
    """The observations that match `pattern` whole, as matches."""
    found = [re.fullmatch(pattern, line) for line in observations(directory)]
    return [match for match in found if match]


def number(text: str) -> float:
    return float(text)


def near(value: float, digits: int = 4):
    """What `value` printed with `digits` significant digits reads back as."""
    return pytest.approx(value, rel=0.6 * 10 ** (1 - digits), abs=1e-12)


def series_of(frame: pd.DataFrame, step: str, **where) -> dict:
    rows = frame
    for column, wanted in where.items():
        rows = rows[rows[column] == wanted]
    return at(rows[step].astype(int), rows["value"])


def check_documents(directory: Path) -> None:
    """report.md links every figure and CSV beside it; report.html embeds every figure, byte for byte, as a
    data: URI and loads nothing else."""
    md = (directory / "report.md").read_text()
    pngs = sorted(path.name for path in directory.glob("*.png"))
    csvs = sorted(path.name for path in directory.glob("*.csv"))
    assert pngs and sorted(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)) == pngs
    assert set(re.findall(r"\]\(([^)]+\.csv)\)", md)) == set(csvs)
    for heading in ("## Summary", "## Setup", "## Results", "## Observations", "## How to reproduce"):
        assert heading in md
    page = (directory / "report.html").read_text()
    sources = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(sources) == len(pngs)
    embedded = [base64.b64decode(source.removeprefix("data:image/png;base64,")) for source in sources]
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    files = {name: (directory / name).read_bytes() for name in pngs}
    assert sorted(len(data) for data in embedded) == sorted(len(data) for data in files.values())
    assert sorted(embedded) == sorted(files.values())
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in embedded)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<link" not in page and "<script" not in page


# ----------------------------------------------------------------------------- m-height / grokking


def test_the_grok_report_draws_each_runs_metrics_and_quotes_them(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = grok_sweep()
    out = tmp_path / "reports" / "grok"
    code, stdout, stderr = report(out, "grok")
    assert code == 0, stderr
    assert f"wrote {out / 'report.md'}" in stdout
    check_documents(out)

    curves, norms = pd.read_csv(out / "curves.csv"), pd.read_csv(out / "norms.csv")
    groups, table = pd.read_csv(out / "groups.csv"), pd.read_csv(out / "runs.csv")
    assert set(curves.run_id) == set(norms.run_id) == set(table.run_id) == set(runs)
    for run_id, series in runs.items():
        for frame, metric in ((curves, "train_loss"), (curves, "val_loss"), (norms, "weight_norm"),
                              (norms, "update_ratio")):
            assert series_of(frame, "epoch", run_id=run_id, metric=metric) == pytest.approx(series[metric])
        val = series["val_loss"]
        best = min(val, key=val.get)
        row = table[table.run_id == run_id].iloc[0]
        assert row.best_val_loss == pytest.approx(val[best]) and row.best_epoch == best
        assert row.test_loss == pytest.approx(next(iter(series["test_loss"].values())))
        assert row.spikes == len(series["slingshot"])
        grokking = series.get("grokking_epoch", {None: None})
        assert (None if pd.isna(row.grokking_epoch) else row.grokking_epoch) == next(iter(grokking.values()))
        at_best = groups[groups.run_id == run_id].set_index("group").val_loss
        assert at_best.to_dict() == pytest.approx({key.removeprefix("val_loss/"): points[best]
                                                   for key, points in series.items() if key.startswith("val_loss/")})

    labels = at(table.run_id, table.run)
    assert sorted(labels.values()) == ["wd=0.01", "wd=0.03", "wd=0.1"]  # the line's label of weight_decay
    by_label = {labels[run_id]: series for run_id, series in runs.items()}

    (best,) = said(out, r"Lowest val log2-MSE: (\S+), (\S+) at epoch (\d+) \(test (\S+) at that epoch\)\.")
    lowest = min(by_label, key=lambda label: min(by_label[label]["val_loss"].values()))
    val = by_label[lowest]["val_loss"]
    assert best[1] == lowest and number(best[2]) == near(min(val.values())) and int(best[3]) == min(val, key=val.get)

    drops = {m[1]: m for m in said(out, r"(\S+): the val loss fell (\S+) %, from (\S+) to (\S+), between epochs "
                                        r"(\d+) and (\d+): its largest fall between two validations after the "
                                        r"first 5; the train loss (rose|fell) (\S+) % over the same epochs "
                                        r"\((\S+) to (\S+)\)\.")}
    falls = {}  # label -> (start, end, relative change) of its largest fall past the first 5 validations
    for label, series in by_label.items():
        epochs, val = sorted(series["val_loss"]), series["val_loss"]
        change = {(epochs[i - 1], epochs[i]): val[epochs[i]] / val[epochs[i - 1]] - 1 for i in range(6, len(epochs))}
        start, end = min(change, key=change.get)
        if change[start, end] <= -0.1:
            falls[label] = (start, end, change[start, end])
    assert set(drops) == set(falls) == {"wd=0.01", "wd=0.03"}  # wd=0.1 never falls by 10 %
    for label, drop in drops.items():
        series, (start, end, change) = by_label[label], falls[label]
        assert (int(drop[5]), int(drop[6])) == (start, end) and number(drop[2]) == near(-100 * change, 3)
        assert number(drop[3]) == near(series["val_loss"][start]) and number(drop[4]) == near(series["val_loss"][end])
        t0, t1 = series["train_loss"][start], series["train_loss"][end]
        assert number(drop[9]) == near(t0) and number(drop[10]) == near(t1)
        assert drop[7] == ("rose" if t1 > t0 else "fell") and number(drop[8]) == near(100 * abs(t1 - t0) / t0, 3)
    grokked = {m[1]: int(m[2]) for m in said(out, r"(\S+): grokking at epoch (\d+) \(val \S+ there\), by "
                                                  r"grok_train's rule \(grok/diagnostics.py\)\.")}
    assert grokked == {"wd=0.01": 60, "wd=0.03": 40}
    assert [m[1] for m in said(out, r"(\S+): no grokking epoch .*")] == ["wd=0.1"]
    spiked = {m[1]: ([int(e) for e in m[3].split(", ")], [number(c) for c in m[4].split(", ")])
              for m in said(out, r"(\S+): (\d+) train-loss spikes? \(Slingshot\) at epochs? ([\d, ]+); the val loss "
                                 r"changed by ([-+\d., e]+) over the 20 epochs after (each|it)\.")}
    assert spiked == {label: (sorted(s["slingshot"]), pytest.approx(list(s["spike/val_loss_change"].values())))
                      for label, s in by_label.items() if s["slingshot"]}
    for match in said(out, r"(\S+): the val loss ended (\S+) % above its best \((\S+) at epoch (\d+) vs (\S+) at "
                           r"epoch (\d+)\)\."):
        val = by_label[match[1]]["val_loss"]
        last = max(val)
        assert int(match[4]) == last and number(match[3]) == near(val[last])
        assert number(match[2]) == near(100 * (val[last] / min(val.values()) - 1), 3)
    assert len(said(out, r".* ended .* above its best .*")) == sum(
        s["val_loss"][max(s["val_loss"])] >= 1.1 * min(s["val_loss"].values()) for s in runs.values())


def test_the_report_is_a_run_of_its_own_and_never_an_input(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = grok_sweep()
    out = tmp_path / "reports" / "grok"
    for _ in range(2):  # the second report selects the same three runs, not the first report's run
        code, _, stderr = report(out, "grok")
        assert code == 0, stderr
        assert set(pd.read_csv(out / "setup.csv").run_id) == set(runs)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("mheight-grokking")
    reports = client.search_runs([experiment.experiment_id], "tags.`labpipe.report` = 'grok'")
    assert len(reports) == 2
    newest = max(reports, key=lambda run: run.info.start_time)
    assert set(newest.data.tags["labpipe.report.runs"].split(",")) == set(runs)
    assert newest.data.tags["mlflow.note.content"].startswith("3 runs of grok_train")
    artifacts = {item.path for item in client.list_artifacts(newest.info.run_id)}
    assert artifacts == {path.name for path in out.iterdir()} >= {"report.md", "report.html", "curves.png",
                                                                   "curves.csv", "runs.csv"}
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=newest.info.run_id, artifact_path="report.md",
                                                          dst_path=str(tmp_path / "download")))
    assert downloaded.read_text() == (out / "report.md").read_text()


def test_reproduction_commands_set_what_differs_from_params_yaml(mlflow_store, tmp_path, monkeypatch):
    """With a params.yaml here (weight_decay 0.01), the 0.01 run is a plain `dvc exp run`, the others set their
    weight decay; the sweep's make target and the report's own command follow."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    runs = grok_sweep()
    code, _, stderr = report(tmp_path / "out", "grok")
    assert code == 0, stderr
    commands = (tmp_path / "out" / "report.md").read_text().split("```bash\n")[1].split("```")[0].splitlines()
    assert [c for c in commands if c.startswith("dvc exp run")] == [
        "dvc exp run", "dvc exp run -S grok.weight_decay=0.03", "dvc exp run -S grok.weight_decay=0.1"]
    assert "labpipe grok-train --set grok.weight_decay=0.03" in commands
    assert "make sweep-grok WDS='0.01 0.03 0.1'" in commands
    ids = commands[-1].removeprefix("labpipe report grok --runs ").split(",")
    assert set(ids) == set(runs)

    # a run of other kinds of values: each labpipe command, applied to params.yaml, gives back its run's params
    odd = logged("grok_train", section("grok", model="moe", output_head="seed", init_from="\"\"", lr="1.0e-5"),
                 {"val_loss": {5: 3.0}, "train_loss": {5: 2.0}})
    code, _, stderr = report(tmp_path / "out", "grok")
    assert code == 0, stderr
    commands = (tmp_path / "out" / "report.md").read_text().split("```bash\n")[1].split("```")[0].splitlines()
    assert not [c for c in commands if c.startswith("make ")]  # the sweep's target cannot set grok.model
    by_hand = [shlex.split(c)[3::2] for c in commands if c.startswith("labpipe grok-train")]
    assert len(by_hand) == 4
    for run_id, sets in zip([*runs, odd], by_hand, strict=True):
        rebuilt = flatten(load_params(tmp_path / "params.yaml", sets).grok, "grok.")
        assert {k: str(v) for k, v in rebuilt.items()} == MlflowClient().get_run(run_id).data.params


def test_real_grok_train_runs_side_by_side(project):
    """Two real grok_train runs of a wd sweep: the report's table holds each run's own best val and test loss,
    as its metrics.json says; the stages' metric names are the ones the report reads."""
    from labpipe.grok.train import run_train
    from test_grok import OUT_DIR, make_grok_project

    directory, repo_params = project
    make_grok_project(directory, repo_params, epochs=6, val_every=3)
    written = {}
    for wd in ("0.01", "0.1"):
        run_train(load_params("params.yaml", [f"grok.weight_decay={wd}"]))
        written[wd] = json.loads((OUT_DIR / "metrics.json").read_text())
    code, _, stderr = report(directory / "reports" / "grok", "grok")
    assert code == 0, stderr
    table = pd.read_csv(directory / "reports" / "grok" / "runs.csv", dtype={"weight_decay": str})
    assert sorted(table.weight_decay) == ["0.01", "0.1"]
    for _, row in table.iterrows():
        expected = written[row.weight_decay]
        assert row.best_val_loss == pytest.approx(expected["best_val_loss"])
        assert row.best_epoch == expected["best_epoch"]
        assert row.test_loss == pytest.approx(expected["test_loss"]) and row.stop_reason == "grok.epochs"
        assert row.spikes == len(expected["slingshot_epochs"]) and row.epochs_run == 6
    groups = pd.read_csv(directory / "reports" / "grok" / "groups.csv", dtype={"run": str})
    for _, row in table.iterrows():
        at_best = groups[groups.run_id == row.run_id].set_index("group").val_loss.to_dict()
        assert at_best == pytest.approx(written[row.weight_decay]["best_val_loss_per_group"])
    setup = pd.read_csv(directory / "reports" / "grok" / "setup.csv")
    assert list(setup["grok.weight_decay"].astype(str)) == ["0.01", "0.1"]
    check_documents(directory / "reports" / "grok")


# ----------------------------------------------------------------------------- HMMs


def hmm_sweep() -> dict:
    """A 2 x 2 sweep of H x K (each its DVC experiment: hmm_train then hmm_eval), 5 epochs each; H=16, K=200
    peaks at epoch 4 and does not beat its bigram. Returns {(H, K): (train id, train series, eval id, eval
    metrics)}."""
    runs = {}
    for index, (hidden, vocabulary) in enumerate(((16, 100), (64, 100), (16, 200), (64, 200))):
        epochs = np.arange(1, 6)
        quality = np.log(hidden) / 10 - np.log(vocabulary) / 5
        heldout = -5 + quality + 0.3 * np.log(epochs)
        if (hidden, vocabulary) == (16, 200):
            heldout[-1] = heldout[-2] - 0.01
        final = 3.5 - quality - 0.1 * epochs
        series = {"train_ll_per_token": at(epochs, heldout + 0.1),
                  "heldout_ll_per_token": at(epochs, heldout), "test_final_ce": at(epochs, final),
                  "test_unique_final_ce": at(epochs, final + 0.05 * (index + 1)),
                  "seed_test_loss": at(epochs, final + 1), "tokens_seen": at(epochs, 1000 * epochs),
                  "epoch_seconds": at(epochs, [0.5] * 5)}
        params = section("hmm", hidden_states=hidden, vocab_size=vocabulary)
        experiment = f"hmm-{hidden}-{vocabulary}"
        train = logged("hmm_train", params, series, dvc_exp=experiment)
        best = int(epochs[np.argmax(heldout)])
        hmm = series["test_final_ce"][best] + 0.01
        metrics = {"final_ce/overall/hmm": hmm, "final_ce/overall/uniform": np.log(vocabulary),
                   "final_ce/overall/unigram": hmm + 0.8,
                   "final_ce/overall/bigram": hmm - 0.05 if (hidden, vocabulary) == (16, 200) else hmm + 0.2,
                   "final_ce/unique/hmm": hmm + 0.1, "kl_from_hmm/overall/bigram": 0.3, "sequences/overall": 400}
        position = {f"position_ce/{name}": {t: 3.0 + t / 10 for t in range(5)} for name in STRATEGIES}
        evaluation = logged("hmm_eval", params, {**{k: {0: v} for k, v in metrics.items()}, **position},
                            {"model": "artifacts/hmm/model.pt"}, dvc_exp=experiment)
        runs[hidden, vocabulary] = (train, series, evaluation, metrics)
    return runs


STRATEGIES = ("hmm", "uniform", "unigram", "bigram")


def test_the_hmm_report_maps_the_sweep_and_weighs_each_hmm_against_its_baselines(mlflow_store, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = hmm_sweep()
    out = tmp_path / "reports" / "hmm"
    code, _, stderr = report(out, "hmm")
    assert code == 0, stderr
    check_documents(out)
    best = {key: max(series["heldout_ll_per_token"], key=series["heldout_ll_per_token"].get)
            for key, (_, series, _, _) in runs.items()}

    sweep = pd.read_csv(out / "sweep.csv")  # the heatmaps: H rows x K columns, at each run's best epoch
    for (hidden, vocabulary), (train, series, _, _) in runs.items():
        cell = sweep[(sweep["hmm.hidden_states"] == hidden) & (sweep["hmm.vocab_size"] == vocabulary)]
        assert set(cell.run_id) == {train}
        for metric in ("test_final_ce", "heldout_ll_per_token"):
            assert cell[cell.metric == metric].value.item() == pytest.approx(series[metric][best[hidden, vocabulary]])
    learning = pd.read_csv(out / "learning.csv")
    for train, series, _, metrics in runs.values():
        for metric in ("heldout_ll_per_token", "test_final_ce"):
            curve = learning[(learning.run_id == train) & (learning.metric == metric)]
            assert at(curve.epoch.astype(int), curve.value) == pytest.approx(series[metric])
        for baseline in ("uniform", "unigram", "bigram"):
            level = learning[(learning.run_id == train) & (learning.metric == f"final_ce/overall/{baseline}")]
            assert level.value.item() == pytest.approx(metrics[f"final_ce/overall/{baseline}"])
    unique = pd.read_csv(out / "unique.csv")
    table = pd.read_csv(out / "runs.csv")
    for key, (train, series, evaluation, metrics) in runs.items():
        row = table[table.run_id == train].iloc[0]
        assert row.eval_run_id == evaluation and row.best_epoch == best[key]  # paired by DVC experiment and params
        assert row.eval_bigram == pytest.approx(metrics["final_ce/overall/bigram"])
        for metric in ("test_final_ce", "test_unique_final_ce"):
            assert unique[(unique.run_id == train) & (unique.metric == metric)].value.item() == \
                pytest.approx(series[metric][best[key]])
    labels = {key: table[table.run_id == train].run.item() for key, (train, _, _, _) in runs.items()}
    assert labels[16, 100] == "H=16 K=100"  # the line's labels of hidden_states and vocab_size

    by_label = {labels[key]: (key, *value) for key, value in runs.items()}
    lowest = said(out, r"Lowest final-token CE at vocab_size=(\d+): (.+), (\S+) nats at epoch (\d+) \(held-out "
                       r"log-likelihood (\S+) nats per token\)\.")
    assert {int(m[1]) for m in lowest} == {100, 200}
    for match in lowest:
        candidates = {key: s for key, (_, s, _, _) in runs.items() if key[1] == int(match[1])}
        winner = min(candidates, key=lambda key: candidates[key]["test_final_ce"][best[key]])
        assert match[2] == labels[winner] and int(match[4]) == best[winner]
        assert number(match[3]) == near(candidates[winner]["test_final_ce"][best[winner]])
        assert number(match[5]) == near(candidates[winner]["heldout_ll_per_token"][best[winner]])
    effects = said(out, r"hidden_states 16 -> 64 at vocab_size=(\d+): final-token CE (\S+) -> (\S+) nats \((\S+)\)\.")
    assert len(effects) == 2
    for match in effects:
        low, high = (runs[h, int(match[1])][1]["test_final_ce"][best[h, int(match[1])]] for h in (16, 64))
        assert (number(match[2]), number(match[3])) == (near(low), near(high))
        assert number(match[4]) == near(high - low, 3)
    assert len(said(out, r"vocab_size 100 -> 200 at hidden_states=(16|64): .*")) == 2
    weighed = said(out, r"(.+): the HMM's final-token CE \(hmm_eval\) is (\S+) nats; it beats (.+?)(?:; not (.+))?; "
                        r"margin to the best baseline, (\w+): (\S+) nats\.")
    assert len(weighed) == 4
    for match in weighed:
        metrics = by_label[match[1]][4]
        hmm = metrics["final_ce/overall/hmm"]
        levels = {b: metrics[f"final_ce/overall/{b}"] for b in ("uniform", "unigram", "bigram")}
        assert number(match[2]) == near(hmm)
        beaten = dict(re.findall(r"(\w+) \((\S+)\)", match[3]))
        assert set(beaten) == {b for b, v in levels.items() if hmm < v}
        assert all(number(v) == near(levels[b]) for b, v in beaten.items())
        assert set(dict(re.findall(r"(\w+) \((\S+)\)", match[4] or ""))) == {b for b, v in levels.items() if hmm >= v}
        closest = min(levels, key=levels.get)
        assert match[5] == closest and number(match[6]) == near(levels[closest] - hmm, 3)
    (gap,) = said(out, r"The unique test set's final-token CE minus the full set's ranges from (\S+) to (\S+) nats at "
                       r"the best epoch; it is higher in (\d+) of (\d+) runs\.")
    gaps = [s["test_unique_final_ce"][best[k]] - s["test_final_ce"][best[k]] for k, (_, s, _, _) in runs.items()]
    assert (number(gap[1]), number(gap[2])) == (near(min(gaps), 3), near(max(gaps), 3))
    assert (int(gap[3]), int(gap[4])) == (sum(g > 0 for g in gaps), 4)
    still = said(out, r"(.+): the held-out log-likelihood still rose at the last epoch \((\d+): (\S+) -> (\S+) "
                      r"nats per token\): more epochs may help\.")
    assert {m[1] for m in still} == {labels[key] for key in runs if best[key] == 5}
    for match in still:
        heldout = by_label[match[1]][2]["heldout_ll_per_token"]
        assert (number(match[3]), number(match[4])) == (near(heldout[4]), near(heldout[5]))


def test_one_swept_param_is_a_line_plot(mlflow_store, tmp_path, monkeypatch):
    """The runs of K=100 (selected by their DVC experiments) differ in H alone: the sweep is CE against H."""
    monkeypatch.chdir(tmp_path)
    runs = hmm_sweep()
    code, _, stderr = report(tmp_path / "out", "hmm", "--dvc-exp", "hmm-16-100", "--dvc-exp", "hmm-64-100")
    assert code == 0, stderr
    sweep = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert set(sweep.columns) == {"hmm.hidden_states", "metric", "value"}
    for hidden in (16, 64):
        series = runs[hidden, 100][1]
        best = max(series["heldout_ll_per_token"], key=series["heldout_ll_per_token"].get)
        for metric in ("test_final_ce", "test_unique_final_ce", "heldout_ll_per_token"):
            rows = sweep[(sweep["hmm.hidden_states"] == hidden) & (sweep.metric == metric)]
            assert rows.value.item() == pytest.approx(series[metric][best])
    assert set(pd.read_csv(tmp_path / "out" / "setup.csv").stage) == {"hmm_train", "hmm_eval"}


# ----------------------------------------------------------------------------- LM


def test_the_lm_report_pairs_each_lm_with_its_own_evaluation(mlflow_store, tmp_path, monkeypatch):
    """Two LMs with the same lm params on the data of two HMMs (two DVC experiments): each is paired with the
    lm_eval run of its own experiment, and its ICL curve is that run's."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for experiment, bayes_level in (("icl-a", 2.0), ("icl-b", 2.4)):
        steps = range(10, 201, 10)
        train = logged("lm_train", section("lm"), {"train_loss": {s: 4 - s / 100 for s in steps},
                                                   "val_loss": {s: 4.1 - s / 100 for s in (50, 100, 150, 200)},
                                                   "lr": {s: 1e-3 for s in steps}}, dvc_exp=experiment)
        positions = np.arange(1, 64)
        curves = {"lm": bayes_level + 1.5 / positions, "bayes": bayes_level + 0 * positions,
                  "unigram": 3.0 + 0 * positions, "bigram": 2.6 + 0 * positions}
        means = {f"{name}_ce": float(curve.mean()) for name, curve in curves.items()}
        metrics = {**means, "lm_excess_over_bayes": means["lm_ce"] - means["bayes_ce"],
                   "lm_excess_over_bayes_last_position": float(curves["lm"][-1] - curves["bayes"][-1]),
                   "sequences": 512}
        evaluation = logged("lm_eval", {**section("lm"), "hmm.eps": PARAMS.hmm.eps},
                            {**{k: {0: v} for k, v in metrics.items()},
                             **{f"icl/{name}": at(positions, curve) for name, curve in curves.items()}},
                            dvc_exp=experiment)
        runs[experiment] = (train, evaluation, curves, metrics)
    out = tmp_path / "reports" / "lm"
    code, _, stderr = report(out, "lm")
    assert code == 0, stderr
    check_documents(out)
    table, icl = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "icl.csv")
    for experiment, (train, evaluation, curves, metrics) in runs.items():
        row = table[table.run_id == train].iloc[0]
        assert row.eval_run_id == evaluation and row.run == experiment  # no param differs: the experiment names it
        assert row.lm_ce == pytest.approx(metrics["lm_ce"]) and row.best_val_loss == pytest.approx(4.1 - 2.0)
        for name, curve in curves.items():
            read_back = icl[(icl.run_id == evaluation) & (icl.curve == name)]
            assert list(read_back.position) == list(range(1, 64))
            assert read_back.value.to_numpy() == pytest.approx(curve)
    (best,) = said(out, r"Lowest mean cross-entropy over positions: (\S+), (\S+) nats, (\S+) above the Bayes loss "
                        r"\((\S+)\)\.")
    metrics = runs["icl-a"][3]
    assert best[1] == "icl-a" and number(best[2]) == near(metrics["lm_ce"])
    assert number(best[3]) == near(metrics["lm_excess_over_bayes"], 3) and number(best[4]) == near(metrics["bayes_ce"])
    for match in said(out, r"(\S+): the LM's excess over the Bayes loss goes from (\S+) nats at position 1 to (\S+) at "
                           r"position 63\."):
        curves = runs[match[1]][2]
        assert number(match[2]) == near(curves["lm"][0] - curves["bayes"][0], 3)
        assert number(match[3]) == near(curves["lm"][-1] - curves["bayes"][-1], 3)
    below = {m[1]: (int(m[2]), m[3]) for m in said(out, r"(\S+): the LM is below the bigram's cross-entropy at (\d+) "
                                                         r"of 63 positions(?:, first at position (\d+))?\.")}
    for experiment, (_, _, curves, _) in runs.items():
        under = np.flatnonzero(curves["lm"] < curves["bigram"]) + 1
        assert below[experiment] == (len(under), str(under[0]) if len(under) else None)
    still = said(out, r"(\S+): best val loss (\S+) at step 200, its last evaluation: the val loss still fell "
                      r"\((\S+) -> (\S+)\)\.")
    assert {m[1] for m in still} == {"icl-a", "icl-b"}


# ----------------------------------------------------------------------------- crosscoders


CROSSCODER_COLUMNS = ("mean_explained_variance", "mean_explained_variance_a", "mean_explained_variance_b",
                      "explained_variance_b", "switch_linear_explained_variance_b", "pct_dead_neurons",
                      "total_dead_neurons", "l0")


def crosscoder_run(penalty: str, norm: float, dead: float, ev_b: float = 0.4, status: str = "FINISHED",
                   columns=CROSSCODER_COLUMNS, **changed) -> str:
    final = {"mean_explained_variance": 0.5 + norm / 10, "mean_explained_variance_a": 0.6,
             "mean_explained_variance_b": 0.4, "explained_variance_b": ev_b,
             "switch_linear_explained_variance_b": 0.45, "pct_dead_neurons": dead,
             "total_dead_neurons": dead * 256, "l0": 12.0}
    final["beats_switch_linear"] = float(final["explained_variance_b"] > final["switch_linear_explained_variance_b"])
    series = {f"final_{name}": {500: value} for name, value in final.items()
              if name in columns or name == "beats_switch_linear"}
    series["mean_explained_variance"] = {step: 0.1 * step / 100 for step in (25, 50, 75)}
    params = section("crosscoder", decoder_norm_in_penalty=penalty, dec_init_norm=norm, dict_size=256, **changed)
    return logged("crosscoder_train", params, series, status=status)


def test_the_crosscoder_report_takes_the_newest_comparable_run_per_penalty_and_norm(mlflow_store, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    crosscoder_run("full", 0.1, 0.9, l1_coef=5.0)  # another setting: not part of this sweep
    crosscoder_run("full", 0.1, 0.5)  # superseded by the newer run at (full, 0.1)
    crosscoder_run("none", 0.3, 0.2, columns=CROSSCODER_COLUMNS[:3])  # an older labpipe's run, without the baseline
    newest = {}
    for penalty, norm, dead, ev_b in (("full", 0.03, 0.3, 0.4), ("full", 0.1, 0.1, 0.5), ("detached", 0.08, 0.2, 0.4),
                                      ("full", 1.0, 0.8, 0.3), ("detached", 0.1, 0.4, 0.46)):
        newest[penalty, norm] = (crosscoder_run(penalty, norm, dead, ev_b, device="cuda"), dead, ev_b)  # where it ran
    crosscoder_run("full", 0.12, 0.0, status="FAILED")
    out = tmp_path / "reports" / "crosscoder"
    code, _, stderr = report(out, "crosscoder")
    assert code == 0, stderr
    check_documents(out)
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(zip(sweep.decoder_norm_in_penalty, sweep.dec_init_norm, sweep.run_id, strict=True)) == [
        (penalty, norm, newest[penalty, norm][0]) for penalty, norm in sorted(newest)]
    client = MlflowClient()
    for _, row in sweep.iterrows():
        metrics = client.get_run(row.run_id).data.metrics
        assert {f"final_{name}": row[f"final_{name}"] for name in CROSSCODER_COLUMNS} == \
            pytest.approx({f"final_{name}": metrics[f"final_{name}"] for name in CROSSCODER_COLUMNS})
    results = (out / "report.md").read_text().split("## Results")[1]
    assert "Left out: 1 run without every final metric" in results and "differing in crosscoder.l1_coef" in results
    assert "Left out: 1 older run at a (penalty, dec_init_norm)" in results

    (full,) = said(out, r"Penalty full: dec_init_norm=(\S+) leaves the fewest dead latents, (\d+) \((\S+) %\), fewer "
                        r"than at both ends of the sweep \((\S+): (\d+), (\S+): (\d+)\): a sweet spot\.")
    assert (float(full[1]), int(full[2]), number(full[3])) == (0.1, round(0.1 * 256), near(10, 3))
    assert (float(full[4]), int(full[5]), float(full[6]), int(full[7])) == (0.03, round(0.3 * 256), 1.0, 205)
    (detached,) = said(out, r"Penalty detached: dec_init_norm=(\S+) leaves the fewest dead latents, (\d+) "
                            r"\((\S+) %\)\.")
    assert float(detached[1]) == 0.08 and int(detached[2]) == round(0.2 * 256)
    (best,) = said(out, r"Highest mean explained variance: penalty (\w+), dec_init_norm=(\S+), (\S+) \(dead latents "
                        r"(\S+) %\)\.")
    assert (best[1], float(best[2]), number(best[3])) == ("full", 1.0, near(0.5 + 1.0 / 10))
    (beats,) = said(out, r"(\d+) of (\d+) crosscoders beat the switching baseline on source b: (.+)\.")
    assert (int(beats[1]), int(beats[2])) == (2, 5)
    assert beats[3] == "detached at 0.1 (0.46 vs 0.45), full at 0.1 (0.5 vs 0.45)"

    def reported(*points) -> Path:
        code, _, stderr = report(tmp_path / "some", "crosscoder", "--runs", ",".join(newest[p][0] for p in points))
        assert code == 0, stderr
        return tmp_path / "some"

    (every,) = said(reported(("full", 0.1), ("detached", 0.1)), r"All 2 crosscoders beat the switching baseline on "
                    r"source b, by (\S+) \((\w+) at (\S+)\) to (\S+) \((\w+) at (\S+)\) in explained variance\.")
    assert (number(every[1]), every[2], every[3]) == (near(0.46 - 0.45, 3), "detached", "0.1")
    assert (number(every[4]), every[5], every[6]) == (near(0.5 - 0.45, 3), "full", "0.1")
    (none,) = said(reported(("full", 0.03), ("full", 1.0)), r"None of the 2 crosscoders beats the switching baseline "
                   r"on source b; the closest, (\w+) at (\S+), reaches (\S+) vs (\S+)\.")
    assert none.groups() == ("full", "0.03", "0.4", "0.45")


def test_make_sweep_crosscoder_queues_every_penalty_at_every_norm_and_says_how_to_report():
    from conftest import make_queued

    queued = make_queued("sweep-crosscoder")
    norms = [0.03, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 1]
    assert sorted(map(sorted, queued)) == sorted(
        sorted([f"crosscoder.decoder_norm_in_penalty={p}", f"crosscoder.dec_init_norm={n:g}"])
        for p in ("none", "detached", "full") for n in norms)  # 24 runs, each once
    for target, line in (("sweep-grok", "grok"), ("sweep-hmm", "hmm"), ("sweep-crosscoder", "crosscoder"),
                         ("report", "grok")):
        dry = subprocess.run(["make", "--no-print-directory", "-n", target,
                              *(["LINE=grok"] if target == "report" else [])], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout  # under make test too
        assert f"labpipe report {line}" in dry.splitlines()[-1], dry


# ----------------------------------------------------------------------------- dormancy


def test_the_dormancy_report_draws_the_three_plots_from_the_runs_metrics(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    steps, layers, taus = (50, 100, 150, 200), (0, 1, 2), (0.0, 0.025, 0.1)
    pct = {(tau, layer, step): 100 * tau * (1 + layer) * step / 200 + rng.random() for tau in taus
           for layer in layers for step in steps}
    series = {}
    for tau in taus:
        for layer in layers:
            series[f"pct_dormant/tau_{tau:g}/layer_{layer}"] = {s: pct[tau, layer, s] for s in steps}
        series[f"pct_dormant/tau_{tau:g}/mean"] = {s: np.mean([pct[tau, layer, s] for layer in layers]) for s in steps}
    logged("dormancy", section("dormancy"), {"pct_dormant/tau_0.1/mean": {50: 99.0}})  # older, same set: not read
    run_id = logged("dormancy", section("dormancy"), series)
    out = tmp_path / "reports" / "dormancy"
    code, _, stderr = report(out, "dormancy")
    assert code == 0, stderr
    check_documents(out)
    assert {path.name for path in out.glob("*.png")} == {"dormancy_over_steps.png", "dormancy_heatmap.png",
                                                         "layer_evolution.png"}
    over = pd.read_csv(out / "dormancy_over_steps.csv").set_index("step")
    for step in steps:  # tau 0.1 is drawn: across layers, per step
        values = [pct[0.1, layer, step] for layer in layers]
        assert (over.loc[step, "mean"], over.loc[step, "min"], over.loc[step, "max"]) == pytest.approx(
            (np.mean(values), min(values), max(values)))
    heat = pd.read_csv(out / "dormancy_heatmap.csv")
    assert {(r.layer_index, r.step): r.pct_dormant for r in heat.itertuples()} == pytest.approx(
        {(layer, step): pct[0.1, layer, step] for layer in layers for step in steps})
    evolution = pd.read_csv(out / "layer_evolution.csv")
    assert set(evolution.layer_index) == set(layers)
    assert pd.read_csv(out / "sets.csv").run_id.tolist() == [run_id]
    mean = series["pct_dormant/tau_0.1/mean"]
    (trend,) = said(out, r"checkpoints: the mean % dormant across layers \(tau = 0.1\) goes from (\S+) % at step 50 "
                         r"to (\S+) % at step 200 \((\S+) points\)\.")
    assert (number(trend[1]), number(trend[2])) == (near(mean[50], 3), near(mean[200], 3))
    assert number(trend[3]) == near(mean[200] - mean[50], 3)
    (ends,) = said(out, r"checkpoints: at step 200 the most dormant layer is (\d+) \((\S+) %\), the least (\d+) "
                        r"\((\S+) %\)\.")
    last = {layer: pct[0.1, layer, 200] for layer in layers}
    assert int(ends[1]) == max(last, key=last.get) and number(ends[2]) == near(max(last.values()), 3)
    assert int(ends[3]) == min(last, key=last.get) and number(ends[4]) == near(min(last.values()), 3)


# ----------------------------------------------------------------------------- selecting runs


def test_the_selection_flags_pick_exactly_their_runs(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = {"epochs": 20}
    a, _ = grok_run(0.01, None, (), seed=0, dvc_exp="exp-a", tags={"labpipe.job_id": "j1"}, **quick)
    b, _ = grok_run(0.03, None, (), seed=1, dvc_exp="exp-b", tags={"labpipe.job_id": "j1"}, **quick)
    c, _ = grok_run(0.1, None, (), seed=2, tags={"labpipe.job_id": "j2"}, **quick)
    failed, _ = grok_run(0.3, None, (), seed=3, status="FAILED", **quick)
    elsewhere = mlflow.create_experiment("elsewhere")
    with mlflow.start_run(experiment_id=elsewhere, tags={"labpipe.stage": "grok_train"}) as other:
        mlflow.log_params(section("grok"))
        mlflow.log_metrics({"val_loss": 2.0, "train_loss": 1.0}, step=5)
    hmm = logged("hmm_train", section("hmm"), {"heldout_ll_per_token": {1: -5.0}})

    def picked(*flags: str) -> set[str]:
        code, _, stderr = report(tmp_path / "out", "grok", *flags)
        assert code == 0, stderr
        return set(pd.read_csv(tmp_path / "out" / "setup.csv").run_id)

    assert picked() == {a, b, c}  # FINISHED runs of the line's experiment; the hmm_train run is another line's
    assert picked() == {a, b, c}  # the first report's own run is no input
    assert picked("--dvc-exp", "exp-a") == {a}
    assert picked("--dvc-exp", "exp-a", "--dvc-exp", "exp-b") == {a, b}
    assert picked("--tag", "labpipe.job_id=j1") == {a, b}
    assert picked("--tag", "labpipe.job_id=j1", "--dvc-exp", "exp-b") == {b}
    assert picked("--runs", f"{c},{failed}") == {c, failed}  # named: whatever their status
    assert picked("--experiment", "elsewhere") == {other.info.run_id}
    assert picked("--runs", other.info.run_id) == {other.info.run_id}  # named runs may be in any experiment
    code, _, stderr = report(tmp_path / "out", "grok", "--runs", hmm)
    assert code == 2 and stderr.strip() == f"labpipe report: error: --runs: {hmm} is a run of hmm_train, not of " \
                                           "grok_train"


@pytest.mark.parametrize("argv,said", [
    pytest.param(["nosuch"], "unknown line 'nosuch': one of grok, hmm, lm, crosscoder, dormancy", id="unknown-line"),
    pytest.param([], "the following arguments are required: line", id="no-line"),
    pytest.param(["grok", "--bogus"], "unrecognized arguments: --bogus", id="unknown-flag"),
    pytest.param(["grok", "--tag", "novalue"], "--tag 'novalue': give it as key=value", id="bad-tag"),
    pytest.param(["grok", "--runs", "0123456789abcdef"], "--runs: no run 0123456789abcdef in sqlite:///",
                 id="unknown-run"),
    pytest.param(["grok", "--dvc-exp", "nope"], "no run of grok_train in experiment 'mheight-grokking' of sqlite:///",
                 id="no-match"),
    pytest.param(["grok", "--experiment", "nope"], "no experiment 'nope' in sqlite:///", id="unknown-experiment"),
    pytest.param(["crosscoder"], "no experiment 'crosscoders' in", id="no-experiment-yet"),
    pytest.param(["grok", "--out", "{occupied}"], "exists and holds no report; name a new folder or an old report's",
                 id="occupied-out"),
    pytest.param(["grok", "MISSING_STORE"], "no MLflow store at sqlite:///", id="missing-store"),
])
def test_a_bad_selection_is_one_line_and_exit_2(mlflow_store, tmp_path, monkeypatch, argv, said):
    monkeypatch.chdir(tmp_path)
    grok_run(0.01, None, (), seed=0, epochs=10)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    if "MISSING_STORE" in argv:
        argv = argv[:1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    argv = [arg.replace("{occupied}", str(occupied)) for arg in argv]
    out = tmp_path / "out"
    code, _, stderr = labpipe("report", *argv, *([] if "--out" in argv else ["--out", str(out)]))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("labpipe report: error: ") and said in lines[0], stderr
    assert not out.exists() and (occupied / "notes.txt").read_text() == "mine" and sorted(os.listdir(occupied)) == [
        "notes.txt"]
    assert not (tmp_path / "none.db").exists()


# ----------------------------------------------------------------------------- data versions, an HTTP store


def test_setup_names_each_runs_data_by_its_dvc_md5(mlflow_store, tmp_path, monkeypatch):
    """A run that logged its inputs as datasets (stage_run, from dvc.yaml's deps) shows them with DVC's md5; a run
    without datasets says so."""
    monkeypatch.chdir(tmp_path)
    without, _ = grok_run(0.01, None, (), seed=0, epochs=10)
    (tmp_path / "artifacts").mkdir()
    data = tmp_path / "artifacts" / "train.parquet"
    pd.DataFrame({"x": [1.0, 2.0]}).to_parquet(data)
    (tmp_path / "dvc.yaml").write_text("stages:\n  grok_train:\n    cmd: labpipe grok-train\n    deps:\n"
                                       "      - artifacts/train.parquet\n      - src/labpipe/grok/train.py\n")
    with_data, _ = grok_run(0.1, None, (), seed=1, epochs=10)
    code, _, stderr = report(tmp_path / "out", "grok")
    assert code == 0, stderr
    setup = pd.read_csv(tmp_path / "out" / "setup.csv").set_index("run_id")
    assert setup.loc[with_data, "data"] == f"artifacts/train.parquet@{hashlib.md5(data.read_bytes()).hexdigest()}"
    assert setup.loc[without, "data"] == "(not recorded)"


@pytest.mark.slow
def test_a_report_from_a_real_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    uri, artifacts = mlflow_server
    monkeypatch.chdir(tmp_path)
    runs = grok_sweep()
    out = tmp_path / "reports" / "grok"
    code, _, stderr = report(out, "grok")
    assert code == 0, stderr
    check_documents(out)
    curves = pd.read_csv(out / "curves.csv")
    for run_id, series in runs.items():
        assert series_of(curves, "epoch", run_id=run_id, metric="val_loss") == pytest.approx(series["val_loss"])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id],
                                "tags.`labpipe.report` = 'grok'")
    served = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert served == {path.name for path in out.iterdir()}
    stored = [path for path in artifacts.rglob("report.html") if run.info.run_id in str(path)]
    assert len(stored) == 1 and stored[0].read_bytes() == (out / "report.html").read_bytes()
