"""The LM report: Llama models trained on the HMM's synthetic data, their in-context learning against the HMM's
Bayes-optimal loss (lm_train, lm_eval).

Each lm_train run is paired with the newest lm_eval run of its DVC experiment and params (select.pair); an
lm_eval run without its training run is shown alone. Figures (each one's data in <name>.csv):
  icl       per lm_eval run, the LM's cross-entropy of x_t against the position t (icl/lm) beside the Bayes loss
            of the HMM that generated the rows (icl/bayes, dashed, same colour), and the LM's excess over it
  learning  train loss (means over log_every steps) and val loss per step of every lm_train run
Table runs: mean CE over positions of the LM, Bayes, unigram and bigram, the LM's excess over Bayes (mean and at
the last position), best val loss and its step, steps, wall time.

Observations, one rule each, from the logged metrics:
  best      the run of lowest mean LM cross-entropy (lm_ce), its excess over the Bayes loss
  icl       per lm_eval run, the excess over Bayes at the first and at the last position
  bigram    per lm_eval run, at how many positions the LM is below the bigram's CE, and the first
  val       per lm_train run, its best val loss and step; when that is its last evaluation, that it still fell
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from labpipe.plotting import pyplot
from labpipe.report import runs as read
from labpipe.report.document import Findings, Table, figure
from labpipe.report.grok import colors
from labpipe.report.select import pair

STAGES = ("lm_train", "lm_eval")
TITLE = "Language models on synthetic HMM data"
SWEEP = None
CURVES = ("lm", "bayes", "unigram", "bigram")
MEANS = ("lm_ce", "bayes_ce", "unigram_ce", "bigram_ce", "lm_excess_over_bayes", "lm_excess_over_bayes_last_position")


def build(runs: list, labels: dict[str, str], keys: list[str], out: Path) -> Findings:
    pairs = pair([r for r in runs if read.stage(r) == "lm_train"], [r for r in runs if read.stage(r) == "lm_eval"])
    curves = read.histories([(train, metric) for train, _ in pairs if train for metric in ("train_loss", "val_loss")]
                            + [(evaluation, f"icl/{name}") for _, evaluation in pairs if evaluation
                               for name in CURVES])
    table = pd.DataFrame([row(train, evaluation, labels, curves) for train, evaluation in pairs])
    table = table.astype({"best_step": "Int64"})
    results = []
    if table.eval_run_id.notna().any():
        results.append(plot_icl(pairs, labels, curves, out))
    if table.run_id.notna().any():
        results.append(plot_learning(pairs, labels, curves, out))
    results.append(Table("runs", "LM runs: mean cross-entropy over positions (nats), best val loss", table))
    observed = observations(pairs, labels, table, curves)
    return Findings(observed[:1], results, observed)


def row(train, evaluation, labels: dict[str, str], curves: dict) -> dict:
    found = {"run": labels[(train or evaluation).info.run_id], "run_id": train.info.run_id if train else None,
             "eval_run_id": evaluation.info.run_id if evaluation else None,
             **{name: evaluation.data.metrics.get(name) if evaluation else None for name in MEANS},
             "best_val_loss": None, "best_step": None, "steps": None, "seconds": None}
    if train is not None:
        val = curves[train.info.run_id, "val_loss"]
        if len(val):
            found.update({"best_val_loss": val.min(), "best_step": int(val.idxmin())})
        found.update({"steps": read.params(train).get("lm.max_steps"), "seconds": read.seconds(train)})
    return found


def plot_icl(pairs: list, labels: dict[str, str], curves: dict, out: Path):
    plt = pyplot()
    drawn, (ce, excess) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    evaluated = [evaluation for _, evaluation in pairs if evaluation is not None]
    points = []
    for evaluation, color in zip(evaluated, colors(len(evaluated)), strict=True):
        run_id, label = evaluation.info.run_id, labels[evaluation.info.run_id]
        lm, bayes = curves[run_id, "icl/lm"], curves[run_id, "icl/bayes"]
        ce.plot(lm.index, lm.to_numpy(), color=color, label=f"{label}: LM")
        ce.plot(bayes.index, bayes.to_numpy(), color=color, linestyle="--", label=f"{label}: Bayes (HMM)")
        gap = lm - bayes
        excess.plot(gap.index, gap.to_numpy(), color=color, label=label)
        points += [{"run_id": run_id, "run": label, "curve": name, "position": int(t), "value": v}
                   for name in CURVES for t, v in curves[run_id, f"icl/{name}"].items()]
    ce.set(xlabel="position t (tokens of context)", ylabel="cross-entropy of x_t (nats)",
           title="LM vs the Bayes-optimal loss")
    excess.set(xlabel="position t (tokens of context)", ylabel="LM minus Bayes (nats)",
               title="The LM's excess over the Bayes loss")
    ce.legend(fontsize=7)
    excess.legend(fontsize=7)
    drawn.suptitle(f"In-context learning curves of {len(evaluated)} lm_eval runs")
    return figure(out, "icl", "Cross-entropy per position: each LM (solid) against the Bayes loss of the HMM that "
                  "generated its data (dashed), and the excess", pd.DataFrame(points), drawn)


def plot_learning(pairs: list, labels: dict[str, str], curves: dict, out: Path):
    plt = pyplot()
    drawn, axis = plt.subplots(figsize=(8, 4.2), layout="constrained")
    trained = [train for train, _ in pairs if train is not None]
    points = []
    for train, color in zip(trained, colors(len(trained)), strict=True):
        label = labels[train.info.run_id]
        for metric, style in (("train_loss", "-"), ("val_loss", "o--")):
            series = curves[train.info.run_id, metric]
            axis.plot(series.index, series.to_numpy(), style, color=color, label=f"{label}: {metric}")
            points += [{"run_id": train.info.run_id, "run": label, "metric": metric, "step": int(s), "value": v}
                       for s, v in series.items()]
    axis.set(xlabel="step", ylabel="causal LM loss (nats/token)", title=f"Learning curves of {len(trained)} "
             "lm_train runs")
    axis.legend(fontsize=7)
    return figure(out, "learning", "Train loss (window means) and val loss per step", pd.DataFrame(points), drawn)


def observations(pairs: list, labels: dict[str, str], table: pd.DataFrame, curves: dict) -> list[str]:
    said = []
    evaluated = table[table.lm_ce.notna()]
    if len(evaluated):
        best = evaluated.loc[evaluated.lm_ce.idxmin()]
        said.append(f"Lowest mean cross-entropy over positions: {best.run}, {best.lm_ce:.4g} nats, "
                    f"{best.lm_excess_over_bayes:.3g} above the Bayes loss ({best.bayes_ce:.4g}).")
    for _, evaluation in pairs:
        if evaluation is None:
            continue
        run_id, label = evaluation.info.run_id, labels[evaluation.info.run_id]
        lm, bayes, bigram = (curves[run_id, f"icl/{name}"] for name in ("lm", "bayes", "bigram"))
        gap = lm - bayes
        if len(gap):
            first, last = gap.index[0], gap.index[-1]
            said.append(f"{label}: the LM's excess over the Bayes loss goes from {gap[first]:.3g} nats at position "
                        f"{first} to {gap[last]:.3g} at position {last}.")
        below = lm < bigram
        said.append(f"{label}: the LM is below the bigram's cross-entropy at {int(below.sum())} of {len(lm)} "
                    "positions" + (f", first at position {below.idxmax()}." if below.any() else "."))
    for train, _ in pairs:
        if train is None:
            continue
        val = curves[train.info.run_id, "val_loss"]
        if len(val):
            text = (f"{labels[train.info.run_id]}: best val loss {val.min():.4g} at step {val.idxmin()}")
            if val.idxmin() == val.index[-1] and len(val) > 1:
                text += f", its last evaluation: the val loss still fell ({val.iloc[-2]:.4g} -> {val.iloc[-1]:.4g})"
            said.append(text + ".")
    return said
