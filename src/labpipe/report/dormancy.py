"""The dormancy report: dormant neurons across training (Sokar et al. 2023; seed 003), from dormancy runs.

A dormancy run logs pct_dormant/tau_<tau>/layer_<i> (and /mean over the layers) at step = the revision's
training step, for every revision of its model. Runs are grouped by model and revision set (dormancy.model,
dormancy.revisions), the newest run of each group read; its rows are rebuilt from those metrics and drawn by
dormancy/plots.py, at its threshold (0.1 when measured, else the largest). Figures per set, with the prefix
<set>_ when there are several (each one's data in <name>.csv, as drawn):
  dormancy_over_steps  mean, min and max % dormant across layers against the step
  dormancy_heatmap     % dormant per layer and step
  layer_evolution      % dormant against the step for the layers that vary most
Table sets: model, revisions, steps, layers, the threshold drawn, mean % dormant at the first and last step.

Observations per set, one rule each, at the threshold drawn:
  trend     mean % dormant across layers (the /mean metric) at the first and at the last step
  layers    the most and the least dormant layer at the last step (or that every layer has the same share)
  varies    the layer whose % dormant varies most across steps (plots.most_variable_layers), its range (or
            that none changes)
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from labpipe.dormancy import plots
from labpipe.report import runs as read
from labpipe.report.document import Figure, Findings, Table

STAGES = ("dormancy",)
TITLE = "Dormant neurons across training"
SWEEP = None
LAYER = re.compile(r"pct_dormant/tau_(?P<tau>[^/]+)/layer_(?P<layer>\d+)")
CAPTIONS = {"dormancy_over_steps": "Mean, min and max % dormant across layers against the training step",
            "dormancy_heatmap": "% dormant per layer and training step",
            "layer_evolution": "% dormant against the step for the layers that vary most"}


def build(runs: list, labels: dict[str, str], keys: list[str], out: Path) -> Findings:
    newest = {}
    for run in runs:  # oldest first: the newest of a set stays
        p = read.params(run)
        newest[p.get("dormancy.model"), p.get("dormancy.revisions")] = run
    sets = list(newest.values())
    metrics = {run.info.run_id: [m for m in run.data.metrics if LAYER.fullmatch(m) or m.endswith("/mean")]
               for run in sets}
    curves = read.histories((run, m) for run in sets for m in metrics[run.info.run_id])
    results, observed, rows = [], [], []
    for number, run in enumerate(sets):
        frame = rows_of(run, curves)
        if frame.empty:
            continue
        tau = plots.choose_threshold(frame, None)
        at = frame[frame.threshold == tau]
        prefix = f"set{number}_" if len(sets) > 1 else ""
        paths = plots.save_plots(frame, f"{out}/{prefix}", tau)
        data = {"dormancy_over_steps": plots.over_steps(at).reset_index(),
                "dormancy_heatmap": plots.heatmap(at, 20).stack().rename("pct_dormant").reset_index(),
                "layer_evolution": plots.most_variable_layers(at, 5).melt(ignore_index=False,
                                                                          value_name="pct_dormant").reset_index()}
        model, revisions = (read.params(run).get(f"dormancy.{key}") for key in ("model", "revisions"))
        name = Path(model).name + (f" {revisions}" if revisions != "[]" else "")  # plots.py's title: the last part
        results += [Figure(path.stem, f"{CAPTIONS[path.stem.removeprefix(prefix)]}: {name} (tau = {tau:g})",
                           data[path.stem.removeprefix(prefix)]) for path in paths]
        mean = curves[run.info.run_id, f"pct_dormant/tau_{tau:g}/mean"]
        rows.append({"set": name, "run_id": run.info.run_id, "model": model, "revisions": revisions,
                     "steps": at.step.nunique(),
                     "layers": at.layer_index.nunique(), "tau": tau, "first_step": int(mean.index[0]),
                     "mean_pct_dormant_first": mean.iloc[0], "last_step": int(mean.index[-1]),
                     "mean_pct_dormant_last": mean.iloc[-1]})
        observed += observations(name, tau, mean, at)
    results.append(Table("sets", "Dormancy runs, one per model and revision set (the newest)", pd.DataFrame(rows)))
    return Findings(observed[:1], results, observed)


def rows_of(run, curves: dict) -> pd.DataFrame:
    """The run's results as dormancy/plots.py reads them (the CSV's columns that the plots use)."""
    model = read.params(run).get("dormancy.model", "")
    rows = []
    for metric in run.data.metrics:
        if match := LAYER.fullmatch(metric):
            rows += [{"model": model, "revision": str(step), "step": int(step), "threshold": float(match["tau"]),
                      "layer_index": int(match["layer"]), "pct_dormant": value}
                     for step, value in curves[run.info.run_id, metric].items()]
    return pd.DataFrame(rows, columns=["model", "revision", "step", "threshold", "layer_index", "pct_dormant"])


def observations(name: str, tau: float, mean: pd.Series, at: pd.DataFrame) -> list[str]:
    last = at[at.step == at.step.max()].set_index("layer_index").pct_dormant
    spread = plots.most_variable_layers(at, 1)
    layer = spread.columns[0]
    said = [f"{name}: the mean % dormant across layers (tau = {tau:g}) goes from {mean.iloc[0]:.3g} % at step "
            f"{mean.index[0]} to {mean.iloc[-1]:.3g} % at step {mean.index[-1]} "
            f"({mean.iloc[-1] - mean.iloc[0]:+.3g} points)."]
    if last.max() > last.min():
        said.append(f"{name}: at step {at.step.max()} the most dormant layer is {last.idxmax()} ({last.max():.3g} %), "
                    f"the least {last.idxmin()} ({last.min():.3g} %).")
    else:
        said.append(f"{name}: at step {at.step.max()} every layer has {last.max():.3g} % dormant.")
    if spread[layer].max() > spread[layer].min():
        said.append(f"{name}: layer {layer} varies most across steps, from {spread[layer].min():.3g} % to "
                    f"{spread[layer].max():.3g} %.")
    else:
        said.append(f"{name}: no layer's % dormant changes across steps.")
    return said
